# Two entry points for a fresh machine: `make run` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install run test test-unit bench clean vocab

$(STAMP): requirements.txt pyproject.toml Makefile  # the install recipe is part of what is installed
	$(PY) -m venv $(VENV)
	# torch first and pinned: anything unpinned (deepspeed included) pulls a CUDA build.
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q uv torch==2.13.0
	# uv writes no .pyc unless told, and where PYTHONDONTWRITEBYTECODE is set (this image) every
	# process (each Ray worker too) would compile ray, deepspeed, mlflow, transformers from source
	# on every import: compiling once here took the demo from 432 s to 303 s (README, Known limits).
	$(BIN)/uv pip install --python $(BIN)/python -q --compile-bytecode -r requirements.txt
	$(BIN)/uv pip install --python $(BIN)/python -q --no-deps -e .
	$(MAKE) vocab
	touch $(STAMP)

# The real CLIP BPE vocabulary (MIT) ships inside the open_clip_torch wheel; take only that file
# (installing open_clip would pull torchvision/timm, which clash with the CPU torch pin).
VOCAB := pipeline/model/assets/bpe_simple_vocab_16e6.txt.gz
vocab: $(VOCAB)
$(VOCAB):
	mkdir -p .cache/wheels $(dir $(VOCAB))
	$(BIN)/pip download -q --no-deps open_clip_torch==3.3.0 -d .cache/wheels
	$(BIN)/python -c "import zipfile,glob,shutil; z=zipfile.ZipFile(sorted(glob.glob('.cache/wheels/open_clip_torch-3.3.0-*.whl'))[0]); shutil.copyfileobj(z.open('open_clip/bpe_simple_vocab_16e6.txt.gz'), open('$(VOCAB)','wb'))"

install: $(STAMP)

# The main job on the embedded default: synthetic data, local Ray, tiny models.
run: $(STAMP)
	$(BIN)/clipvip demo --out out/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -x --timeout=900 tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not slow and not gpu" tests

bench: $(STAMP)
	$(BIN)/python bench/decode.py

clean:
	rm -rf out .pytest_cache

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

.PHONY: install run test test-unit bench clean

$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first and pinned: anything unpinned (deepspeed included) pulls a CUDA build.
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q uv torch==2.13.0
	$(BIN)/uv pip install --python $(BIN)/python -q -r requirements.txt
	$(BIN)/uv pip install --python $(BIN)/python -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: synthetic data, local Ray, tiny models.
run: $(STAMP)
	$(BIN)/clipvip demo --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --timeout=900 tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not slow and not gpu" tests

bench: $(STAMP)
	$(BIN)/python bench/decode.py

clean:
	rm -rf out .pytest_cache

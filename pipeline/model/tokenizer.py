"""The real OpenAI CLIP BPE tokenizer, built offline from the vocab file open_clip ships.

`pipeline/model/assets/bpe_simple_vocab_16e6.txt.gz` (fetched by `make vocab` from the
open_clip_torch wheel) holds the 48,894 merges OpenAI CLIP uses. The vocabulary is rebuilt the
way open_clip's SimpleTokenizer does: the 256 byte-level characters, the same with "</w>", one
token per merge (lines 1..48894 after the header), then <|startoftext|> (49406) and
<|endoftext|> (49407): 49,408 entries, ids identical to OpenAI CLIP. It is handed to
transformers' CLIPTokenizer (v5: tokenizers-backed, the same class as CLIPTokenizerFast), whose
normaliser/pre-tokeniser are those of the HF CLIP tokenizer CLIP-ViP used (clipvip_spec.md 3.2).
Building it in memory takes ~0.2 s, so nothing is cached on disk.

Differences from open_clip's SimpleTokenizer, all inherited from the HF tokenizer CLIP-ViP used:
no ftfy and no html.unescape (subtitles are unescaped upstream in pipeline/data/subtitles.py);
NFC normalisation as ftfy would do. Ours also never turns text into special tokens (below).

Pooling contract (the text tower pools at input_ids.argmax(-1), spec 1.4): <|endoftext|> = 49407
is the largest id and also the pad id, and torch.argmax returns the FIRST maximum. `tokenize`
guarantees exactly one 49407 before the padding, as the last real token:
- truncation (HF truncation=True with special tokens) keeps BOS + the first max_len-2 tokens +
  EOT, exactly what CLIP-ViP's CLIPTokenizerFast and open_clip's truncation produce;
- padding is 49407 after the EOT, so the first maximum is still the real EOT;
- a literal "<|endoftext|>" inside the text is byte-pair encoded as ordinary text
  (split_special_tokens=True); otherwise it would become id 49407 mid-sentence and argmax would
  pool there.

Shape legend: B texts, L = max_len.
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from transformers import CLIPTokenizer

__all__ = [
    "BOS_ID",
    "CONTEXT_LENGTH",
    "EOT_ID",
    "VOCAB_PATH",
    "VOCAB_SIZE",
    "bytes_to_unicode",
    "load_clip_tokenizer",
    "read_bpe_merges",
    "tokenize",
]

VOCAB_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # open_clip keeps lines 1..48894 of the file
VOCAB_SIZE = 256 + 256 + NUM_MERGES + 2  # 49408
BOS_ID = VOCAB_SIZE - 2  # <|startoftext|> 49406
EOT_ID = VOCAB_SIZE - 1  # <|endoftext|> 49407, also the pad id
CONTEXT_LENGTH = 77  # CLIP's text position embeddings
BOS_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode char table (256 entries, fixed order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def read_bpe_merges(path: str | os.PathLike[str] = VOCAB_PATH) -> list[tuple[str, str]]:
    """The 48,894 CLIP merges, in rank order, from the gzipped open_clip vocab file.

    Raises:
        FileNotFoundError: the file is missing (run `make vocab`).
        ValueError: the file does not hold enough well-formed merges.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP BPE vocab not found at {path}; run `make vocab` (it extracts "
            "open_clip/bpe_simple_vocab_16e6.txt.gz from the open_clip_torch wheel)"
        )
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: expected {NUM_MERGES} 'a b' merge lines after the header")
    return merges  # type: ignore[return-value]


@functools.lru_cache(maxsize=4)
def _vocab_and_merges(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = read_bpe_merges(path)
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOT_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return vocab, merges


def load_clip_tokenizer(vocab_path: str | os.PathLike[str] | None = None) -> CLIPTokenizer:
    """A new HF CLIPTokenizer with OpenAI CLIP's vocabulary (ids match open_clip / OpenAI).

    Args:
        vocab_path: gzipped BPE file; default `VOCAB_PATH`.

    Returns:
        The tokenizer: 49,408 tokens, bos 49406, eos = pad = unk 49407.

    Raises:
        FileNotFoundError: the vocab file is missing (run `make vocab`).
    """
    vocab, merges = _vocab_and_merges(str(vocab_path or VOCAB_PATH))
    # Pass vocab/merges as objects: in transformers v5 the vocab_file=/merges_file= kwargs are
    # silently ignored and yield a 3-token vocabulary (environment.md section 6).
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
    assert len(tok) == VOCAB_SIZE and tok.eos_token_id == EOT_ID and tok.bos_token_id == BOS_ID
    tok.model_max_length = CONTEXT_LENGTH
    return tok


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> CLIPTokenizer:
    return load_clip_tokenizer()


def tokenize(
    texts: Sequence[str], max_len: int, tokenizer: CLIPTokenizer | None = None
) -> tuple[Tensor, Tensor]:
    """Tokenise, truncate and pad to exactly `max_len` (ModelConfig.max_text_len).

    Args:
        texts: B strings.
        max_len: tokens per row including BOS and EOT, in [2, 77].
        tokenizer: from `load_clip_tokenizer`; default a shared module-level one.

    Returns:
        input_ids_BL: [B, L] int64; BOS, text, one EOT (49407), then pad 49407.
        mask_BL: [B, L] int64; 1 for BOS..EOT, 0 for padding.

    Raises:
        ValueError: max_len outside [2, 77].
        TypeError: a text is not a str (e.g. None from a missing caption).
    """
    if not 2 <= max_len <= CONTEXT_LENGTH:
        raise ValueError(f"max_len must be in [2, {CONTEXT_LENGTH}] (BOS + EOT fit), got {max_len}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
    if not texts:
        empty_BL = torch.zeros(0, max_len, dtype=torch.int64)
        return empty_BL, empty_BL.clone()
    tok = tokenizer if tokenizer is not None else _default_tokenizer()
    enc = tok(
        texts,
        padding="max_length",
        truncation=True,
        max_length=max_len,
        split_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)

"""The offline CLIP tokenizer: ids identical to OpenAI CLIP / open_clip, padding and truncation.

Expected ids come from the known CLIP encoding of one sentence (environment.md section 6) and,
for harder strings, from `_ReferenceBPE` below: an independent pure-Python re-implementation of
open_clip's SimpleTokenizer byte-pair encoder over the same merges file. Non-ASCII test text is
written with escapes (house style: ASCII-only sources).
"""

from __future__ import annotations

import gzip
import unicodedata

import pytest
import regex
import torch

from pipeline.model.tokenizer import (
    BOS_ID,
    EOT_ID,
    VOCAB_PATH,
    VOCAB_SIZE,
    load_clip_tokenizer,
    tokenize,
)

GUITAR_IDS = [49406, 320, 786, 533, 1629, 320, 5084, 49407]


class _ReferenceBPE:
    """open_clip's algorithm, written out: clean, split, byte-encode, greedy lowest-rank merges."""

    def __init__(self) -> None:
        lines = gzip.open(VOCAB_PATH).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        byte_to_char, extra = {}, 0
        for b in range(256):
            if b in keep:
                byte_to_char[b] = chr(b)
            else:
                byte_to_char[b] = chr(256 + extra)
                extra += 1
        # Table order: printable bytes first, then the remapped ones (as in CLIP).
        chars = [byte_to_char[b] for b in keep] + [byte_to_char[b] for b in range(256) if b not in keep]
        tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        self.byte_to_char = byte_to_char
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.pattern = regex.compile(
            r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )

    def _bpe(self, word: str) -> list[str]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        # ftfy.fix_text (open_clip) normalises to NFC; then whitespace collapse and lower case.
        text = " ".join(unicodedata.normalize("NFC", text).split()).lower()
        out = [self.ids["<|startoftext|>"]]
        for piece in self.pattern.findall(text):
            word = "".join(self.byte_to_char[b] for b in piece.encode("utf-8"))
            out += [self.ids[t] for t in self._bpe(word)]
        return out + [self.ids["<|endoftext|>"]]


@pytest.fixture(scope="module")
def reference() -> _ReferenceBPE:
    return _ReferenceBPE()


@pytest.fixture(scope="module")
def tok():
    return load_clip_tokenizer()


def test_known_ids_and_vocab_size(tok, reference):
    assert tok("a man is playing a guitar")["input_ids"] == GUITAR_IDS
    assert reference.encode("a man is playing a guitar") == GUITAR_IDS
    assert len(tok) == VOCAB_SIZE == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOT_ID, EOT_ID) == (49406, 49407, 49407)
    assert tok.convert_ids_to_tokens([BOS_ID, EOT_ID]) == ["<|startoftext|>", "<|endoftext|>"]


HARD_TEXTS = [
    "  Caf\u00e9   D\u00c9J\u00c0-vu!!  ",
    "Cafe\u0301 au lait",  # decomposed accent: NFC makes it the same as the composed one
    "Hello, world... it's 2023 (really)?! I'M SURE YOU'LL see",
    "na\u00efve r\u00e9sum\u00e9 \u2014 100% \u00abok\u00bb\ttab\nnew  line",
    "emoji \U0001f600 and CJK \u4e2d\u6587, \u00fcber-stra\u00dfe",
    "x" * 40 + " antidisestablishmentarianism",
]


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_ids_match_independent_bpe(tok, reference, text):
    expected = reference.encode(text)
    assert tok(text)["input_ids"] == expected
    ids, mask = tokenize([text], max_len=77, tokenizer=tok)
    assert ids[0, : len(expected)].tolist() == expected
    assert mask[0].sum().item() == len(expected)


def test_padding_and_mask():
    ids, mask = tokenize(["a man is playing a guitar", ""], max_len=12)
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == mask.dtype == torch.int64
    assert ids[0].tolist() == GUITAR_IDS + [EOT_ID] * 4
    assert mask[0].tolist() == [1] * 8 + [0] * 4
    assert ids[1].tolist() == [BOS_ID] + [EOT_ID] * 11
    assert mask[1].tolist() == [1, 1] + [0] * 10


def test_truncation_keeps_eot_last(reference):
    text = "one two three four five six seven eight nine ten eleven twelve"
    full = reference.encode(text)
    ids, mask = tokenize([text], max_len=8)
    assert len(full) > 8
    assert ids[0].tolist() == full[:7] + [EOT_ID]
    assert mask[0].tolist() == [1] * 8


def test_argmax_pools_at_the_real_eot():
    texts = [
        "short",
        "one two three four five six seven eight nine ten eleven twelve",
        "",
        "a literal <|endoftext|> and <|startoftext|> in a subtitle",
        "<|endoftext|>",
    ]
    ids, mask = tokenize(texts, max_len=10)
    last_real = mask.sum(-1) - 1
    assert torch.equal(ids.argmax(-1), last_real)
    assert torch.equal(ids.gather(1, last_real[:, None]).squeeze(1), torch.full((5,), EOT_ID))
    # exactly one EOT among the real tokens; special strings in text are ordinary text
    assert ((ids == EOT_ID) & (mask == 1)).sum(-1).tolist() == [1] * 5
    assert ((ids == BOS_ID) & (mask == 1)).sum(-1).tolist() == [1] * 5


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_len"):
        tokenize(["a"], max_len=1)
    with pytest.raises(ValueError, match="max_len"):
        tokenize(["a"], max_len=78)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tokenize(["a", None], max_len=8)  # type: ignore[list-item]
    ids, mask = tokenize([], max_len=8)
    assert ids.shape == mask.shape == (0, 8)
    with pytest.raises(FileNotFoundError, match="make vocab"):
        load_clip_tokenizer(tmp_path / "missing.txt.gz")

"""CLIP tokenizers over small byte-pair vocabularies built in code, so nothing is downloaded.

A vocabulary is a CLIP-layout ``vocab.json`` (symbols, word-final symbols ending in ``</w>``,
merged pieces, then the two special tokens) and a ranked ``merges.txt``; :func:`clip_tokenizer`
turns them into a real ``transformers.CLIPTokenizer``. The tiny test models
(:mod:`dreamguide.testing`, byte-level symbols) and the toy world's model
(:mod:`dreamguide.toyworld.model`, letters and digits) each choose their own vocabulary and
build their tokenizer here; :func:`bpe` is the merge rule the tokenizer itself applies.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


def bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word as CLIP applies it: merge the lowest-ranked adjacent pair
    (the leftmost if it occurs twice) until no adjacent pair has a rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def clip_tokenizer(vocab: dict[str, int], merges: list[str], model_max_length: int):
    """A ``CLIPTokenizer`` read from ``vocab`` and ``merges`` (``"a b"`` lines, highest priority first)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="dreamguide-tokenizer-") as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length)

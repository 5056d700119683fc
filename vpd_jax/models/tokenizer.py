"""SD-style CLIP tokenisation: transformers' `CLIPTokenizer` from a local folder, fixed-length int32 ids.

Padding to `max_length` and truncation, as ldm's FrozenCLIPEmbedder and VPD's refer code do (docs/reference.md,
"Referring model"). The padding token is whatever the folder's tokenizer config says: `<|endoftext|>` for SD v1, `!` for
SD v2.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

_VOCAB_FILES = ("vocab.json", "merges.txt")


class Tokenizer:
    """Callable `tok(texts, max_length) -> np.ndarray int32 (len(texts), max_length)`."""

    def __init__(self, hf_tokenizer):
        self.hf_tokenizer = hf_tokenizer

    @property
    def pad_token_id(self) -> int:
        return self.hf_tokenizer.pad_token_id

    @property
    def bos_token_id(self) -> int:
        return self.hf_tokenizer.bos_token_id

    @property
    def eos_token_id(self) -> int:
        return self.hf_tokenizer.eos_token_id

    def __call__(self, texts: Sequence[str], max_length: int) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("Tokenizer expects a sequence of strings, got a single str")
        encoded = self.hf_tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                                    return_attention_mask=False)
        return np.asarray(encoded["input_ids"], dtype=np.int32).reshape(len(texts), max_length)


def resolve_tokenizer_folder(path: str | os.PathLike) -> str:
    """`path` itself if it holds vocab.json + merges.txt (or tokenizer.json), else its `tokenizer/` subfolder
    (a diffusers pipeline root)."""
    path = os.fspath(path)
    for folder in (path, os.path.join(path, "tokenizer")):
        if _has_tokenizer_files(folder):
            return folder
    raise FileNotFoundError(
        f"no CLIP tokenizer in {path!r}: expected vocab.json and merges.txt (or tokenizer.json) there or in "
        f"its tokenizer/ subfolder")


def _has_tokenizer_files(folder: str) -> bool:
    return (all(os.path.isfile(os.path.join(folder, f)) for f in _VOCAB_FILES)
            or os.path.isfile(os.path.join(folder, "tokenizer.json")))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a CLIP tokenizer folder (or a pipeline root's `tokenizer/`) without touching the network."""
    from transformers import CLIPTokenizer

    return Tokenizer(CLIPTokenizer.from_pretrained(resolve_tokenizer_folder(path), local_files_only=True))


class WordHashTokenizer:
    """A stand-in for runs with no CLIP tokenizer files (scratch training of a tiny model, the demo, tests):
    lower-cased words -> a stable hash into [1, vocab_size - 1), with BOS = 0 and EOS = padding = vocab_size - 1,
    laid out like CLIP's ids (BOS, words, EOS, EOS padding). It carries no pretrained meaning; a model trained
    with it must be evaluated with it."""

    def __init__(self, vocab_size: int):
        if vocab_size < 3:
            raise ValueError(f"WordHashTokenizer needs vocab_size >= 3, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id = 0, vocab_size - 1
        self.pad_token_id = self.eos_token_id

    def _word_id(self, word: str) -> int:
        import zlib

        return 1 + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - 2)

    def __call__(self, texts: Sequence[str], max_length: int) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("WordHashTokenizer expects a sequence of strings, got a single str")
        ids = np.full((len(texts), max_length), self.pad_token_id, np.int32)
        for row, text in enumerate(texts):
            words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
            tokens = [self.bos_token_id, *map(self._word_id, words)][: max_length - 1] + [self.eos_token_id]
            ids[row, : len(tokens)] = tokens
        return ids

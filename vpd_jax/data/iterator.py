"""Host-side iterator over a batched tf.data pipeline: numpy batches, tokenisation, checkpoints.

CLIP tokenisation is Python (transformers), so it runs here, after batching, on the host; the tf.data
pipeline itself stays pure TF and its iterator stays checkpointable. Tokenisation is a deterministic function
of the batch, so restoring the tf.data iterator restores the exact token stream too.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

# tok(texts, max_length) -> int (len(texts), max_length); e.g. vpd_jax.models.tokenizer.load_tokenizer(folder)
TokenizeFn = Callable[[Sequence[str], int], np.ndarray]


class DataIterator:
    """Iterates numpy batches of `dataset`; `text` (if present) becomes `tokens` when a tokenizer is given.

    Without a tokenizer, `text` is returned as a numpy array of bytes. String fields other than `text`
    (ids) are returned as bytes arrays. `save`/`restore` write and read this process's tf.data iterator
    state; call them with a per-process path (one checkpoint per process).
    """

    def __init__(self, dataset: tf.data.Dataset, tokenizer: Optional[TokenizeFn] = None,
                 max_length: Optional[int] = None, keep_text: bool = False):
        if tokenizer is not None and not max_length:
            raise ValueError("a tokenizer needs max_length (data.text_max_length)")
        self.dataset = dataset
        self.tf_iterator = iter(dataset)
        self._checkpoint = tf.train.Checkpoint(iterator=self.tf_iterator)
        self._tokenizer, self._max_length, self._keep_text = tokenizer, max_length, keep_text

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = {key: value.numpy() for key, value in next(self.tf_iterator).items()}
        if self._tokenizer is not None and "text" in batch:
            batch["tokens"] = self._tokenize(batch["text"])
            if not self._keep_text:
                del batch["text"]
        return batch

    def _tokenize(self, texts: np.ndarray) -> np.ndarray:
        strings = [t.decode("utf-8") for t in texts]
        tokens = np.asarray(self._tokenizer(strings, self._max_length))
        if tokens.shape != (len(strings), self._max_length) or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokenizer returned {tokens.dtype} {tokens.shape}, expected int ({len(strings)}, "
                             f"{self._max_length})")
        return tokens.astype(np.int32)

    def save(self, path_prefix: str) -> str:
        """Writes the iterator state; returns the checkpoint path to pass to `restore`."""
        return self._checkpoint.write(path_prefix)

    def restore(self, path: str) -> None:
        self._checkpoint.read(path).assert_consumed()


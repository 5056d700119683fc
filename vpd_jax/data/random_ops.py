"""Stateless random draws for tf.data augmentations.

Every augmentation takes one per-element `seed` (an int32/int64 tensor of shape (2,), e.g. a pair from
`tf.data.Dataset.random(seed).batch(2)`) and derives one independent stream per operation with `sub_seed(seed, "name")`.
Only `tf.random.stateless_*` ops are used, so a pipeline built from these functions has no hidden random state and its
iterator can be saved with `tf.train.Checkpoint` (vpd_jax/run/checkpoint.py keeps one per process), so a resumed run
draws what an uninterrupted one would. Streams are keyed by name, not by position, so adding an operation does not
change the draws of the others. The Philox algorithm is pinned: "auto_select" may pick a different generator on another
device, which would break "same seed, same output".
"""
import zlib

import tensorflow as tf

_ALG = "philox"


def check_seed(seed: tf.Tensor) -> tf.Tensor:
    """Returns `seed` as an int64 tensor of shape (2,), or raises naming what was passed."""
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        raise TypeError(f"seed must be an int32/int64 tensor of shape (2,), got dtype {seed.dtype.name}")
    if not seed.shape.is_compatible_with([2]):
        raise ValueError(f"seed must have shape (2,), got {seed.shape}")
    return tf.ensure_shape(tf.cast(seed, tf.int64), [2])


def sub_seed(seed: tf.Tensor, name: str) -> tf.Tensor:
    """An independent seed for the operation called `name` (a stable CRC32 of the name is folded in)."""
    key = zlib.crc32(name.encode()) & 0x7FFFFFFF
    return tf.random.experimental.stateless_fold_in(check_seed(seed), key, alg=_ALG)


def uniform(seed: tf.Tensor, lo: float, hi: float, shape=(), dtype=tf.float64) -> tf.Tensor:
    """U[lo, hi). float64 by default: the references draw Python/numpy doubles."""
    return tf.random.stateless_uniform(shape, seed, minval=lo, maxval=hi, dtype=dtype, alg=_ALG)


def randint(seed: tf.Tensor, lo, hi_exclusive, shape=()) -> tf.Tensor:
    """Integers in [lo, hi_exclusive) (numpy `randint` / torch `randint` semantics), int32."""
    lo = tf.cast(lo, tf.int32)
    hi_exclusive = tf.cast(hi_exclusive, tf.int32)
    return tf.random.stateless_uniform(shape, seed, minval=lo, maxval=hi_exclusive, dtype=tf.int32, alg=_ALG)


def bernoulli(seed: tf.Tensor, p: float) -> tf.Tensor:
    """A scalar bool that is True with probability p (p = 0 never, p = 1 always)."""
    return uniform(seed, 0.0, 1.0) < p

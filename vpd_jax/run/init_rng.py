"""The random key a run's parameters are initialised from: `init_key(seed, config.init_rng)`.

'threefry2x32' is JAX's default generator: the key is `jax.random.key(seed)`. 'hash' is a counter-based generator
of our own, for initialisation only, that XLA compiles in a fraction of the time. A model's initialiser draws every
parameter from its own key, and each threefry draw lowers to a hundred-odd integer operations, so the compiled
initialiser of even the tiny SD-shaped model is thousands of operations and compiles longer than the model's train
step (`python -m bench.init_compile` measures both; the README's "Speed and memory" has the numbers). With 'hash',
the initialisers' distributions stay the same and the values differ. Training keys (dropout, noise) always come from
JAX's default generator.

The hash generator. A key is two uint32 words (k0, k1); element i of a draw is fmix(fmix(i ^ k0) + k1), where fmix
is MurmurHash3's 32-bit finaliser, a bijection whose every output bit depends on every input bit; `fold_in(key, d)`
and `split` derive the child words from (k0, k1) and d (or the child's index) through fmix as well. An element
depends only on the key and its index, so a draw is the same however XLA partitions it over a mesh (what
jax_threefry_partitionable gives threefry). It is no cryptographic generator and meant for nothing but initial
weights: tests/run/test_init_rng.py checks the uniformity, bit balance and independence an initialiser needs.
"""
from __future__ import annotations

import math

import jax
import jax.extend as jex
import jax.numpy as jnp
from jax import lax

INIT_RNGS = ("threefry2x32", "hash")

_U32 = jnp.uint32
_GOLDEN = 0x9E3779B9  # odd constants that spread consecutive counters and data over the words
_MIX = 0x85EBCA6B


def _fmix(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser (full avalanche; a bijection of uint32)."""
    x = x ^ (x >> _U32(16))
    x = x * _U32(0x85EBCA6B)
    x = x ^ (x >> _U32(13))
    x = x * _U32(0xC2B2AE35)
    return x ^ (x >> _U32(16))


def _child(key: jax.Array, data: jax.Array) -> jax.Array:
    """The key derived from `key` and uint32 `data` (any shape): (..., 2)."""
    return jnp.stack([_fmix(key[0] ^ _fmix(data + _U32(_GOLDEN))), _fmix(key[1] + data * _U32(_MIX) + _U32(1))],
                     axis=-1)


def _seed(seed: jax.Array) -> jax.Array:
    seed = jnp.asarray(seed)
    low = lax.convert_element_type(seed, jnp.uint32)
    high = (lax.convert_element_type(lax.shift_right_logical(seed, jnp.asarray(32, seed.dtype)), jnp.uint32)
            if seed.dtype.itemsize == 8 else jnp.zeros((), jnp.uint32))
    return jnp.stack([_fmix(high ^ _U32(_GOLDEN)), _fmix(low + _U32(_MIX))])


def _fold_in(key: jax.Array, data: jax.Array) -> jax.Array:
    return _child(key, lax.convert_element_type(data, jnp.uint32))


def _split(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return _child(key, lax.iota(jnp.uint32, math.prod(shape))).reshape(*shape, 2)


def _random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    if bit_width not in (8, 16, 32, 64):
        raise TypeError(f"the hash generator draws 8, 16, 32 or 64 bits, not {bit_width}")
    counter = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    bits = _fmix(_fmix(counter ^ key[0]) + key[1])
    if bit_width == 32:
        return bits
    if bit_width == 64:
        high, low = (lax.convert_element_type(word, jnp.uint64) for word in (bits, _fmix(bits ^ key[0])))
        return (high << jnp.uint64(32)) | low
    return lax.convert_element_type(bits >> _U32(32 - bit_width), {8: jnp.uint8, 16: jnp.uint16}[bit_width])


HASH_PRNG = jex.random.define_prng_impl(key_shape=(2,), seed=_seed, split=_split, random_bits=_random_bits,
                                        fold_in=_fold_in, name="vpd_jax_hash", tag="vh")


def check_init_rng(name: str) -> None:
    if name not in INIT_RNGS:
        raise ValueError(f"config.init_rng={name!r}; use one of {', '.join(map(repr, INIT_RNGS))}")


def init_key(seed: int, name: str) -> jax.Array:
    """The key that initialises a model: `seed` in generator `name` (one of INIT_RNGS)."""
    check_init_rng(name)
    return jax.random.key(seed) if name == "threefry2x32" else jax.random.key(seed, impl=HASH_PRNG)

"""config.init_rng: JAX's default key unchanged, and the 'hash' generator good enough for initial weights (uniform,
balanced bits, independent elements and keys, deterministic, the same however a draw is sharded)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from vpd_jax.run.init_rng import HASH_PRNG, init_key

N = 1 << 16


def test_threefry_is_jax_default_key():
    key = init_key(3, "threefry2x32")
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(3)))
    assert jax.random.key_impl(key) == jax.random.key_impl(jax.random.key(3))


def test_hash_key_uses_the_hash_generator_and_unknown_names_are_refused():
    assert jax.random.key_impl(init_key(0, "hash")) == jax.random.key_impl(jax.random.key(0, impl=HASH_PRNG))
    with pytest.raises(ValueError, match=r"config\.init_rng='mt19937'; use one of 'threefry2x32', 'hash'"):
        init_key(0, "mt19937")


def test_hash_draws_are_uniform_with_balanced_bits_and_no_serial_correlation():
    key = init_key(0, "hash")
    u = np.asarray(jax.random.uniform(key, (N,)), np.float64)
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    counts = np.histogram(u, bins=16, range=(0, 1))[0]
    chi2 = ((counts - N / 16) ** 2 / (N / 16)).sum()
    assert chi2 < 40, chi2  # 15 degrees of freedom: P(chi2 > 40) < 1e-3
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02
    bits = np.asarray(jax.random.bits(key, (N,), jnp.uint32))
    ones = np.array([((bits >> b) & 1).mean() for b in range(32)])
    assert np.all(np.abs(ones - 0.5) < 0.01), ones
    normal = np.asarray(jax.random.normal(key, (N,)), np.float64)
    assert abs(normal.mean()) < 0.02 and abs(normal.std() - 1) < 0.02


@pytest.mark.parametrize("derive", ["fold_in", "split"])
def test_hash_keys_derived_from_one_key_draw_independent_values(derive):
    """What a Flax initialiser sees: sibling keys (fold_in of consecutive data, or split) and their draws."""
    key = init_key(1, "hash")
    children = ([jax.random.fold_in(key, i) for i in range(64)] if derive == "fold_in"
                else list(jax.random.split(key, 64)))
    draws = np.stack([np.asarray(jax.random.uniform(k, (2048,)), np.float64) for k in children])
    correlation = np.corrcoef(draws)[np.triu_indices(64, 1)]
    assert np.abs(correlation).max() < 0.12, np.abs(correlation).max()  # sd 0.022 for independent draws
    means = draws.mean(axis=1)
    assert np.abs(means - 0.5).max() < 0.04  # sd 0.0064 each
    # the same key draws the same values; another seed other values
    np.testing.assert_array_equal(draws[3], np.asarray(jax.random.uniform(children[3], (2048,)), np.float64))
    other = np.asarray(jax.random.uniform(init_key(2, "hash"), (2048,)))
    assert abs(np.corrcoef(other, np.asarray(jax.random.uniform(key, (2048,))))[0, 1]) < 0.1


def test_hash_draws_do_not_depend_on_how_they_are_sharded():
    mesh = jax.make_mesh((4, 2), ("a", "b"), devices=jax.devices()[:8])
    key = init_key(5, "hash")

    def draw(k):
        return jax.random.uniform(jax.random.fold_in(k, 7), (16, 12, 6))

    whole = jax.jit(draw)(key)
    sharded = jax.jit(draw, out_shardings=NamedSharding(mesh, PartitionSpec("a", None, "b")))(key)
    assert len(sharded.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(whole))

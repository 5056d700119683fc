"""TextAdapter against a PyTorch module of the same definition; context builder shapes and semantics."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vpd_jax.models.text_adapter import TextAdapter, depth_context, referring_context, segmentation_context

DIM = 16


class TorchAdapter(torch.nn.Module):
    def __init__(self, dim, gamma):
        super().__init__()
        self.fc = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU(), torch.nn.Linear(dim, dim))
        self.gamma = torch.nn.Parameter(torch.full((dim,), gamma))

    def forward(self, t):
        return t + self.gamma * self.fc(t)


def _params(adapter, seed=0):
    return nn.meta.unbox(adapter.init(jax.random.key(seed), jnp.zeros((1, DIM))))["params"]


def test_matches_torch_with_ported_weights():
    adapter = TextAdapter(gamma_init=0.7)  # a large gamma so the MLP branch matters in the comparison
    params = _params(adapter)
    ref = TorchAdapter(DIM, 0.7)
    with torch.no_grad():
        for i in (0, 2):
            ref.fc[i].weight.copy_(torch.from_numpy(np.asarray(params[f"fc_{i}"]["kernel"]).T.copy()))
            ref.fc[i].bias.copy_(torch.from_numpy(np.array(params[f"fc_{i}"]["bias"])))
        ref.gamma.copy_(torch.linspace(-1, 1, DIM))
    params = {**params, "gamma": jnp.linspace(-1, 1, DIM)}
    x = np.random.default_rng(0).normal(size=(2, 5, DIM)).astype(np.float32) * 3
    got = adapter.apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), ref(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_init_is_torch_default_and_gamma_small():
    params = _params(TextAdapter())
    bound = 1 / math.sqrt(DIM)
    np.testing.assert_array_equal(params["gamma"], np.full(DIM, 1e-4, np.float32))
    for name in ("fc_0", "fc_2"):
        for leaf in (params[name]["kernel"], params[name]["bias"]):
            assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.6 * bound
    # the exact GELU, not the tanh approximation: check through the hidden nonlinearity
    adapter = TextAdapter(gamma_init=1.0)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, DIM)), jnp.float32)
    h = x @ params["fc_0"]["kernel"] + params["fc_0"]["bias"]
    want = x + (jax.nn.gelu(h, approximate=False) @ params["fc_2"]["kernel"] + params["fc_2"]["bias"])
    np.testing.assert_allclose(adapter.apply({"params": {**params, "gamma": jnp.ones(DIM)}}, x), want, rtol=1e-6)


def test_segmentation_context_broadcasts_all_classes():
    adapter = TextAdapter(gamma_init=0.5)
    params = _params(adapter)
    emb = jnp.asarray(np.random.default_rng(2).normal(size=(7, DIM)), jnp.float32)
    ctx = segmentation_context(adapter.bind({"params": params}), emb, batch_size=3)
    assert ctx.shape == (3, 7, DIM)
    np.testing.assert_allclose(ctx[2], adapter.apply({"params": params}, emb), rtol=1e-6)
    np.testing.assert_array_equal(ctx[0], ctx[1])


def test_depth_context_one_scene_token_per_image():
    adapter = TextAdapter(gamma_init=0.5)
    params = _params(adapter)
    emb = jnp.asarray(np.random.default_rng(3).normal(size=(5, DIM)), jnp.float32)
    bound = adapter.bind({"params": params})
    ids = jnp.asarray([4, 0, 4])
    ctx = depth_context(bound, emb, ids)
    assert ctx.shape == (3, 1, DIM)
    np.testing.assert_allclose(ctx[0, 0], adapter.apply({"params": params}, emb[4]), rtol=1e-6)
    np.testing.assert_allclose(ctx[1, 0], adapter.apply({"params": params}, emb[0]), rtol=1e-6)
    with pytest.raises(ValueError, match=r"\[5\]"):
        depth_context(bound, emb, jnp.asarray([1, 5]))
    jitted = jax.jit(lambda i: depth_context(adapter.bind({"params": params}), emb, i))
    assert np.isnan(np.asarray(jitted(jnp.asarray([7])))).all()


def test_referring_context_tokenwise():
    adapter = TextAdapter(gamma_init=0.5)
    params = _params(adapter)
    tokens = jnp.asarray(np.random.default_rng(4).normal(size=(2, 6, DIM)), jnp.float32)
    ctx = referring_context(adapter.bind({"params": params}), tokens)
    assert ctx.shape == (2, 6, DIM)
    np.testing.assert_allclose(ctx[1, 3], adapter.apply({"params": params}, tokens[1, 3]), rtol=1e-6)
    with pytest.raises(ValueError, match=r"\(6, 16\)"):
        referring_context(adapter.bind({"params": params}), tokens[0])

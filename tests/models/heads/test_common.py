"""Head building blocks against torch: BatchNorm (train/eval, running stats), ConvTranspose2d, initialisers."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.models.heads.torch_port import nchw, nhwc, rel_err
from vpd_jax.models.heads import common


def test_batchnorm_matches_torch_train_and_eval():
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(3, 5, 4, 6)).astype(np.float32)
    ref = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 2, 6))
        ref.bias.copy_(torch.linspace(-1, 1, 6))
    bn = common.BatchNorm()
    variables = nn.meta.unbox(bn.init(jax.random.key(0), jnp.asarray(x), train=False))
    variables["params"] = {"scale": jnp.linspace(0.5, 2, 6), "bias": jnp.linspace(-1, 1, 6)}
    for step in range(2):  # two steps: the momentum update compounds
        y, updates = bn.apply(variables, jnp.asarray(x * (step + 1)), train=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
        want = ref.train()(nchw(x * (step + 1)))
        assert rel_err(y, nhwc(want)) < 1e-5
    np.testing.assert_allclose(variables["batch_stats"]["mean"], ref.running_mean.numpy(), rtol=1e-5)
    # torch updates the running variance with the unbiased batch variance
    np.testing.assert_allclose(variables["batch_stats"]["var"], ref.running_var.numpy(), rtol=1e-5)
    y = bn.apply(variables, jnp.asarray(x), train=False)
    assert rel_err(y, nhwc(ref.eval()(nchw(x)))) < 1e-5


@pytest.mark.parametrize("kernel_size", [2, 3, 4])
def test_conv_transpose_matches_torch(kernel_size):
    padding, output_padding = common.deconv_config(kernel_size)
    ref = torch.nn.ConvTranspose2d(6, 5, kernel_size, stride=2, padding=padding, output_padding=output_padding)
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 6)).astype(np.float32)
    layer = common.ConvTranspose(5, kernel_size, 2, padding, output_padding)
    params = {"kernel": jnp.asarray(ref.weight.detach().numpy().transpose(2, 3, 0, 1)),
              "bias": jnp.asarray(ref.bias.detach().numpy())}
    y = layer.apply({"params": params}, jnp.asarray(x))
    assert y.shape == (2, 6, 8, 5)
    assert rel_err(y, nhwc(ref(nchw(x)))) < 1e-5
    with pytest.raises(ValueError, match="5"):
        common.deconv_config(5)


def _init(initializer, shape, seed=0):
    return np.asarray(initializer(jax.random.key(seed, impl="rbg"), shape, jnp.float32))


def test_initialisers():
    shape = (3, 3, 64, 96)  # HWIO
    k = _init(common.kaiming_normal_fan_out(), shape)
    assert abs(k.std() / math.sqrt(2 / (96 * 9)) - 1) < 0.03 and np.abs(k).max() > 3.5 * k.std()  # not truncated
    x = _init(common.xavier_uniform(), shape)
    bound = math.sqrt(6 / (64 * 9 + 96 * 9))
    assert np.abs(x).max() <= bound and np.abs(x).max() > 0.99 * bound
    t = _init(common.trunc_normal(0.02), (200_000,))
    assert abs(t.std() / 0.02 - 1) < 0.02 and np.abs(t).max() > 0.07  # bounds +-2 absolute: effectively untruncated
    t = _init(common.trunc_normal(1.0), (200_000,))
    assert np.abs(t).max() <= 2.0


def test_batchnorm_statistics_are_global_over_a_sharded_batch():
    """SyncBN for free under jit over a mesh; `axis_name` gives the same inside shard_map."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from vpd_jax.parallel import make_mesh

    mesh = make_mesh({"data": 8, "fsdp": 1, "tensor": 1}, jax.devices()[:8])
    x = np.random.default_rng(2).normal(size=(8, 3, 3, 4)).astype(np.float32) + np.arange(8)[:, None, None, None]
    bn = common.BatchNorm()
    variables = nn.meta.unbox(jax.eval_shape(lambda x: bn.init(jax.random.key(0), x, train=False), x))
    variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), variables)
    train = lambda module: lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"])
    want_y, want_stats = jax.jit(train(bn))(variables, jnp.asarray(x))
    sharded = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data")))
    y, stats = jax.jit(train(bn))(variables, sharded)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6)
    synced = jax.shard_map(train(common.BatchNorm(axis_name="data")), mesh=mesh, in_specs=(P(), P("data")),
                           out_specs=(P("data"), P()), check_vma=False)
    y2, stats2 = jax.jit(synced)(variables, sharded)
    np.testing.assert_allclose(y2, want_y, rtol=1e-5, atol=1e-6)
    for a, b, c in zip(jax.tree.leaves(stats), jax.tree.leaves(stats2), jax.tree.leaves(want_stats)):
        np.testing.assert_allclose(a, c, rtol=1e-5)
        np.testing.assert_allclose(b, c, rtol=1e-5)

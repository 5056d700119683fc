"""Mesh construction, logical-axis resolution and sharded initialisation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vpd_jax import parallel
from vpd_jax.models.layers import Conv, Dense


def test_mesh_shape_resolution():
    assert parallel.resolve_mesh_shape({"data": -1}, 8) == (8, 1, 1)
    assert parallel.resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one"):
        parallel.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="6 devices but 8"):
        parallel.resolve_mesh_shape({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        parallel.resolve_mesh_shape({"model": 8}, 8)
    mesh = parallel.make_mesh({"fsdp": 4, "data": -1}, jax.devices()[:8])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = Conv(16, 3, padding=1, name="conv")(x)  # kernel (3, 3, 3, 16): 3 input channels
        return Dense(8, axes=("embed", "mlp"), name="dense")(x)  # kernel (16, 8)


def test_non_divisible_dimensions_stay_unsharded_and_init_is_sharded():
    mesh = parallel.make_mesh({"fsdp": 8}, jax.devices()[:8])
    module = _Tiny()
    x = jnp.ones((1, 4, 4, 3))
    variables, shardings = parallel.init_sharded(lambda rng: module.init(rng, x), mesh, jax.random.key(0))
    params = variables["params"]
    # conv_in=3 does not divide over fsdp=8: replicated on that dim; dense's 16 inputs do.
    assert params["conv"]["kernel"].sharding.spec == P(None, None, None, None)
    assert params["dense"]["kernel"].sharding.spec == P("fsdp", None)
    assert shardings["params"]["dense"]["kernel"].spec == P("fsdp", None)
    assert {s.data.shape for s in params["dense"]["kernel"].addressable_shards} == {(2, 8)}
    # Same values as an unsharded init.
    plain = nn.meta.unbox(module.init(jax.random.key(0), x))
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_partial_joint_axes_keep_the_dividing_prefix():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4}, jax.devices()[:8])
    # act_batch -> ('data', 'fsdp'): a batch of 2 divides 'data' but not 'data' x 'fsdp'.
    boxed = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((2, 5), jnp.float32), ("act_batch", None))
    assert parallel.logical_to_shardings(boxed, mesh).spec == P("data", None)
    boxed = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((16, 5), jnp.float32), ("act_batch", None))
    assert parallel.logical_to_shardings(boxed, mesh).spec == P(("data", "fsdp"), None)

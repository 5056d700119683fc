"""The convolution implementations: the im2col matrix product against XLA's convolution (values and gradients),
the 'auto' rule, and the switch reaching the `Conv` layer through `Compute.trace_scope`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpd_jax.models import convolution
from vpd_jax.models.compute import Compute
from vpd_jax.models.layers import Conv

# (input NHWC, kernel size, in -> out channels, stride, padding pairs)
SHAPES = [
    ((2, 9, 7, 5), 3, 6, 1, ((1, 1), (1, 1))),  # odd, non-square map
    ((1, 8, 8, 4), 3, 3, 2, ((1, 1), (1, 1))),  # the UNet's stride-2 downsampler
    ((2, 8, 6, 3), 3, 4, 2, ((0, 1), (0, 1))),  # the VAE's asymmetric downsampler
    ((1, 6, 6, 7), 1, 5, 1, ((0, 0), (0, 0))),  # 1x1: a plain dot
    ((1, 10, 10, 2), 5, 3, 1, ((2, 2), (2, 2))),
    ((3, 5, 5, 4), 3, 4, 1, ((0, 0), (0, 0))),  # 'valid'
]


def _rel(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("x_shape, k, features, stride, padding", SHAPES)
def test_matmul_form_equals_xla_convolution_in_values_and_gradients(x_shape, k, features, stride, padding):
    rng = np.random.default_rng(sum(x_shape) + k)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, x_shape[-1], features)), jnp.float32)

    def run(implementation):
        def loss(x, kernel):
            y = convolution.conv2d(x, kernel, stride, padding, implementation)
            return jnp.sum(jnp.sin(y)), y  # a non-constant cotangent

        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, kernel)
        return y, grads

    y_xla, (dx_xla, dk_xla) = run("xla")
    y_mm, (dx_mm, dk_mm) = run("matmul")
    assert y_mm.shape == y_xla.shape
    assert _rel(y_mm, y_xla) <= 1e-6
    assert _rel(dx_mm, dx_xla) <= 1e-5
    assert _rel(dk_mm, dk_xla) <= 1e-5


def test_auto_picks_the_matrix_product_only_where_xla_cpu_is_slower():
    same = ((1, 1), (1, 1))
    resolve = convolution.resolve
    # 1x1 unpadded, stride 1: a dot, whatever the size
    assert resolve("auto", (1, 64, 64, 320), (1, 1, 320, 320), 1, ((0, 0), (0, 0)), "cpu") == "matmul"
    assert resolve("auto", (1, 64, 64, 8), (1, 1, 8, 8), 1, ((0, 0), (0, 0)), "cpu") == "matmul"
    # 3x3 on a small map with many channels; the bounds are inclusive
    assert resolve("auto", (1, 16, 16, 1280), (3, 3, 1280, 1280), 1, same, "cpu") == "matmul"
    assert resolve("auto", (1, 16, 16, 256), (3, 3, 256, 256), 1, same, "cpu") == "matmul"
    assert resolve("auto", (1, 32, 32, 640), (3, 3, 640, 320), 2, same, "cpu") == "matmul"  # 16x16 output
    assert resolve("auto", (1, 17, 16, 1280), (3, 3, 1280, 1280), 1, same, "cpu") == "xla"
    assert resolve("auto", (1, 16, 16, 255), (3, 3, 255, 1280), 1, same, "cpu") == "xla"
    assert resolve("auto", (1, 64, 64, 320), (3, 3, 320, 320), 1, same, "cpu") == "xla"
    # other platforms: XLA's convolution
    for platform in ("gpu", "tpu"):
        assert resolve("auto", (1, 8, 8, 1280), (3, 3, 1280, 1280), 1, same, platform) == "xla"
        assert resolve("auto", (1, 8, 8, 1280), (1, 1, 1280, 1280), 1, ((0, 0), (0, 0)), platform) == "xla"
    # under a mesh (the trainer's programs), even of one device: XLA's convolution
    with jax.set_mesh(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])):
        assert resolve("auto", (1, 8, 8, 1280), (3, 3, 1280, 1280), 1, same, "cpu") == "xla"
        assert resolve("auto", (1, 8, 8, 1280), (1, 1, 1280, 1280), 1, ((0, 0), (0, 0)), "cpu") == "xla"
    # an explicit choice is kept
    assert resolve("xla", (1, 8, 8, 1280), (1, 1, 1280, 1280), 1, ((0, 0), (0, 0)), "cpu") == "xla"
    assert resolve("matmul", (1, 64, 64, 3), (3, 3, 3, 3), 1, same, "tpu") == "matmul"


def test_an_unknown_implementation_is_refused_by_name():
    with pytest.raises(ValueError, match="'im2col'.*'auto', 'xla', 'matmul'"):
        convolution.resolve("im2col", (1, 8, 8, 4), (3, 3, 4, 4), 1, ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="config.compute: unknown convolution implementation 'fast'"):
        Compute.from_config(dict(conv="fast"))
    assert Compute.from_config(dict(conv="xla")).conv == "xla"


def _has_convolution(fn, *args) -> bool:
    return "convolution(" in jax.jit(fn).lower(*args).as_text(dialect="hlo")


@pytest.mark.parametrize("conv, expect_convolution", [("xla", True), ("matmul", False)])
def test_the_compute_switch_reaches_the_conv_layer_through_the_trace_scope(conv, expect_convolution):
    layer = Conv(4, 3, padding=1)
    x = jnp.ones((1, 8, 8, 3))
    params = layer.init(jax.random.key(0), x)

    def forward(params, x):
        with Compute(conv=conv).trace_scope():
            return layer.apply(params, x)

    assert _has_convolution(forward, params, x) == expect_convolution
    # outside any scope the rule is 'auto' (3 channels: XLA's convolution on every platform), and a layer's own
    # `implementation` overrides the scope
    assert _has_convolution(lambda p, x: layer.apply(p, x), params, x)
    pinned = Conv(4, 3, padding=1, implementation="matmul")
    with Compute(conv="xla").trace_scope():
        assert not _has_convolution(lambda p, x: pinned.apply(p, x), params, x)
    np.testing.assert_allclose(jax.jit(forward)(params, x), layer.apply(params, x), rtol=1e-6, atol=1e-6)

"""How the `Conv` layer computes a 2-D convolution: XLA's convolution, or the same sum as one matrix product.

Implementations (`compute.conv`, set while a model is traced by `Compute.trace_scope`):
  'xla'     jax.lax.conv_general_dilated: XLA's convolution, on every shape.
  'matmul'  an im2col matrix product: the k*k shifted (strided) views of the padded input side by side on the
            channel axis, times the HWIO kernel read as a (k*k*in, out) matrix; a 1x1 unpadded convolution is a
            plain dot. The same sums as 'xla' in another order (float32 results agree to rounding).
  'auto'    (default) 'matmul' where XLA:CPU's convolution is measured slower, 'xla' everywhere else: on the CPU
            outside any mesh (so not in the trainer's programs), 1x1 unpadded stride-1 convolutions, and
            convolutions of at least CPU_MATMUL_MIN_CHANNELS input channels whose output has at most
            CPU_MATMUL_MAX_POSITIONS positions per image (the SD UNet's 16x16 and 8x8 levels at 512 px). Other
            platforms keep XLA's convolution (cuDNN / the TPU's), which nothing here has been measured against.

Why on the CPU: XLA:CPU runs a convolution over a small feature map with many channels far below its matmul
speed, and its gradients copy the kernel (reversed and transposed for the input gradient, relaid out for the
weight gradient) on every step; the matrix form's gradients are two matrix products and a sum of shifted
slices, with no kernel copy (bench/op_profile.py shows the split; BENCHMARKS.md the train step it buys).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import jax
import jax.numpy as jnp

CONV_IMPLEMENTATIONS = ("auto", "xla", "matmul")
# The 'auto' rule's bounds, from forward+backward timings of single 3x3 convolutions on a 2-core AMD EPYC
# (XLA:CPU, float32): at 16x16 and below, 320-1280 channels, the matrix form took 0.35-0.8x XLA's time; at
# 32x32 the two were within 10 %, at 64x64 XLA's convolution was faster. Below a few hundred channels the
# difference is noise and XLA's single op compiles faster.
CPU_MATMUL_MAX_POSITIONS = 16 * 16
CPU_MATMUL_MIN_CHANNELS = 256

_IMPLEMENTATION = contextvars.ContextVar("vpd_jax_conv_implementation", default="auto")

PaddingPairs = Sequence[tuple[int, int]]


def check_implementation(name: str) -> None:
    if name not in CONV_IMPLEMENTATIONS:
        raise ValueError(f"unknown convolution implementation {name!r}; valid: {CONV_IMPLEMENTATIONS}")


@contextlib.contextmanager
def implementation_context(name: str):
    """Convolutions traced inside use implementation `name` (one of CONV_IMPLEMENTATIONS)."""
    check_implementation(name)
    token = _IMPLEMENTATION.set(name)
    try:
        yield
    finally:
        _IMPLEMENTATION.reset(token)


def current_implementation() -> str:
    return _IMPLEMENTATION.get()


def output_size(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def resolve(implementation: str, x_shape: Sequence[int], kernel_shape: Sequence[int], stride: int,
            padding: PaddingPairs, platform: str | None = None) -> str:
    """'xla' or 'matmul' for a convolution of an NHWC input by an HWIO kernel ('auto' decided here)."""
    check_implementation(implementation)
    if implementation != "auto":
        return implementation
    if (platform or jax.default_backend()) != "cpu" or _traced_on_a_mesh():
        return "xla"
    k_h, k_w, channels, _ = kernel_shape
    if (k_h, k_w) == (1, 1) and stride == 1 and all(p == (0, 0) for p in padding):
        return "matmul"
    positions = (output_size(x_shape[1], k_h, stride, padding[0])
                 * output_size(x_shape[2], k_w, stride, padding[1]))
    small_map = positions <= CPU_MATMUL_MAX_POSITIONS and channels >= CPU_MATMUL_MIN_CHANNELS
    return "matmul" if small_map else "xla"


def _traced_on_a_mesh() -> bool:
    """Whether a mesh is in effect (`jax.set_mesh`, as in the trainer): 'auto' then keeps XLA's convolution. The
    matrix form with an fsdp x tensor-sharded kernel gave kernel gradients far outside float rounding on XLA:CPU's
    8 fake devices (tests/run/test_train.py, the pretrained sharded step), and a one-device mesh must compute as
    the sharded one does; the speed was measured without a mesh (bench's backbone)."""
    return not jax.sharding.get_abstract_mesh().empty


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: PaddingPairs,
           implementation: str | None = None) -> jax.Array:
    """NHWC input, HWIO kernel, the same stride on both axes, explicit ((top, bottom), (left, right)) padding.
    `implementation` None: the one in effect (`implementation_context`, 'auto' by default)."""
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    chosen = resolve(implementation or current_implementation(), x.shape, kernel.shape, stride, padding)
    if chosen == "xla":
        return jax.lax.conv_general_dilated(x, kernel, window_strides=(stride, stride), padding=padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return conv2d_as_matmul(x, kernel, stride, padding)


def conv2d_as_matmul(x: jax.Array, kernel: jax.Array, stride: int, padding: PaddingPairs) -> jax.Array:
    """The convolution as one matrix product of the im2col patches and the kernel. JAX's own derivative of it is
    what makes it fast on XLA:CPU: the kernel gradient is patches^T @ dy (already in HWIO order) and the input
    gradient dy @ kernel^T folded back by a sum of shifted slices."""
    k_h, k_w, channels, features = kernel.shape
    batch = x.shape[0]
    out_h = output_size(x.shape[1], k_h, stride, padding[0])
    out_w = output_size(x.shape[2], k_w, stride, padding[1])
    if (k_h, k_w) != (1, 1) or any(p != (0, 0) for p in padding):
        x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    views = [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]
             for i in range(k_h) for j in range(k_w)]
    patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)  # (kh, kw, in) order, as HWIO
    y = jnp.dot(patches.reshape(batch * out_h * out_w, k_h * k_w * channels),
                kernel.reshape(k_h * k_w * channels, features))
    return y.reshape(batch, out_h, out_w, features)

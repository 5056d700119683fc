"""resize.py against torch.nn.functional.interpolate (NCHW there, NHWC here)."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpd_jax.models import resize

# (in_hw, out_hw): up, down, identity, non-integer ratios both ways, 1-pixel edges.
SIZES = [((8, 8), (16, 16)), ((16, 16), (8, 8)), ((7, 5), (7, 5)), ((7, 5), (12, 9)), ((13, 11), (5, 4)),
         ((6, 9), (17, 4)), ((1, 4), (3, 1)), ((12, 12), (29, 7))]


def _torch(x_nhwc, size, **kw):
    t = torch.from_numpy(np.transpose(x_nhwc, (0, 3, 1, 2)).copy())
    return np.transpose(F.interpolate(t, size=size, **kw).numpy(), (0, 2, 3, 1))


def _input(in_hw, seed=0, channels=3):
    return np.random.default_rng(seed).normal(size=(2, *in_hw, channels)).astype(np.float32)


@pytest.mark.parametrize("in_hw,out_hw", SIZES)
@pytest.mark.parametrize("align_corners", [False, True])
def test_bilinear_matches_torch(in_hw, out_hw, align_corners):
    x = _input(in_hw)
    got = np.asarray(resize.bilinear(jnp.asarray(x), out_hw, align_corners=align_corners))
    want = _torch(x, out_hw, mode="bilinear", align_corners=align_corners)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_bicubic_matches_torch(in_hw, out_hw):
    x = _input(in_hw, seed=1)
    got = np.asarray(resize.bicubic(jnp.asarray(x), out_hw))
    want = _torch(x, out_hw, mode="bicubic", align_corners=False)
    np.testing.assert_allclose(got, want, atol=3e-6, rtol=1e-6)


@pytest.mark.parametrize("in_hw,out_hw", SIZES + [((480, 640), (512, 683)), ((37, 3), (11, 29))])
def test_nearest_matches_torch_including_int_labels(in_hw, out_hw):
    labels = np.random.default_rng(2).integers(0, 256, size=(1, *in_hw, 1)).astype(np.int32)
    got = np.asarray(resize.nearest(jnp.asarray(labels), out_hw))
    want = _torch(labels.astype(np.float32), out_hw, mode="nearest").astype(np.int32)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


def test_works_without_batch_dim_and_in_bf16():
    x = _input((5, 6))[0]
    got = resize.bilinear(jnp.asarray(x, jnp.bfloat16), (9, 4))
    assert got.shape == (9, 4, 3) and got.dtype == jnp.bfloat16
    want = _torch(x[None], (9, 4), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2)


def test_dispatch_and_errors():
    x = jnp.asarray(_input((4, 4)))
    np.testing.assert_array_equal(resize.resize(x, (8, 8), "bilinear", align_corners=True),
                                  resize.bilinear(x, (8, 8), align_corners=True))
    with pytest.raises(ValueError, match="'area'"):
        resize.resize(x, (8, 8), "area")
    with pytest.raises(ValueError, match="align_corners"):
        resize.resize(x, (8, 8), "nearest", align_corners=True)
    with pytest.raises(TypeError, match="int32"):
        resize.bilinear(jnp.zeros((1, 4, 4, 1), jnp.int32), (8, 8))
    with pytest.raises(ValueError, match=r"\(8,\)"):
        resize.bilinear(x, (8,))

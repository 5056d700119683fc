"""SimpleDecoding against a PyTorch module written from docs/reference.md, "Referring model" (LAVT)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from tests.models.heads.torch_port import count, nchw, nhwc, perturb_, rel_err, shapes, torch_to_flax
from vpd_jax.models.heads.refer import SimpleDecoding


class TorchSimpleDecoding(torch.nn.Module):
    def __init__(self, c1, c2, c3, c4, factor=2):
        super().__init__()
        hidden = c4 // factor
        for stage, cin in (("4", c4 + c3), ("3", hidden + c2), ("2", hidden + c1)):
            setattr(self, f"conv1_{stage}", torch.nn.Conv2d(cin, hidden, 3, padding=1, bias=False))
            setattr(self, f"bn1_{stage}", torch.nn.BatchNorm2d(hidden))
            setattr(self, f"conv2_{stage}", torch.nn.Conv2d(hidden, hidden, 3, padding=1, bias=False))
            setattr(self, f"bn2_{stage}", torch.nn.BatchNorm2d(hidden))
        self.conv1_1 = torch.nn.Conv2d(hidden, 2, 1)

    def forward(self, x_c4, x_c3, x_c2, x_c1, size):
        x = x_c4
        for stage, skip in (("4", x_c3), ("3", x_c2), ("2", x_c1)):
            if x.size(-2) < skip.size(-2) or x.size(-1) < skip.size(-1):
                x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=True)
            x = torch.cat([x, skip], dim=1)
            x = F.relu(getattr(self, f"bn1_{stage}")(getattr(self, f"conv1_{stage}")(x)))
            x = F.relu(getattr(self, f"bn2_{stage}")(getattr(self, f"conv2_{stage}")(x)))
        return F.interpolate(self.conv1_1(x), size=size, mode="bilinear", align_corners=True)


L = 5
CHANS, SIZES = (8, 12 + L, 16 + L, 16), (16, 8, 4, 2)


def _ported(seed=0):
    torch.manual_seed(seed)
    ref = perturb_(TorchSimpleDecoding(*CHANS), seed)
    rng = np.random.default_rng(seed)
    feats = [rng.normal(size=(2, s, s, c)).astype(np.float32) for s, c in zip(SIZES, CHANS)]
    head = SimpleDecoding()
    ours = jax.eval_shape(lambda f: nn.meta.unbox(head.init(jax.random.key(0), f, train=False)),
                          [jnp.asarray(f) for f in feats])
    variables = torch_to_flax(ref)
    assert shapes(variables) == shapes(ours)
    return ref, head, variables, feats


def _torch_forward(ref, feats, size):
    x_c1, x_c2, x_c3, x_c4 = [nchw(f) for f in feats]
    return nhwc(ref(x_c4, x_c3, x_c2, x_c1, size))


def test_eval_matches_torch():
    ref, head, variables, feats = _ported()
    got = jax.jit(lambda v, f: head.apply(v, f, train=False, output_size=(128, 128)))(
        variables, [jnp.asarray(f) for f in feats])
    assert got.shape == (2, 128, 128, 2)
    assert rel_err(got, _torch_forward(ref.eval(), feats, (128, 128))) < 1e-4


def test_train_batch_statistics_match_torch():
    ref, head, variables, feats = _ported(seed=1)
    got, updates = jax.jit(lambda v, f: head.apply(v, f, train=True, output_size=(128, 128),
                                                   mutable=["batch_stats"]))(variables, [jnp.asarray(f) for f in feats])
    assert rel_err(got, _torch_forward(ref.train(), feats, (128, 128))) < 1e-4
    for ours, theirs in zip(jax.tree.leaves(updates["batch_stats"]), jax.tree.leaves(torch_to_flax(ref)["batch_stats"])):
        assert rel_err(ours, theirs) < 1e-5


def test_parameter_count_and_default_init():
    head = SimpleDecoding()
    feats = [jax.ShapeDtypeStruct((1, s, s, c), jnp.float32)
             for s, c in zip((64, 32, 16, 8), (320, 640 + 40, 1280 + 40, 1280))]
    variables = jax.eval_shape(lambda f: nn.meta.unbox(head.init(jax.random.key(0), f, train=False)), feats)
    convs = 9 * 640 * ((2560 + 40) + (1280 + 40) + 960) + 3 * 9 * 640 * 640
    assert count(variables["params"]) == convs + 6 * 2 * 640 + 640 * 2 + 2
    assert count(variables["batch_stats"]) == 6 * 2 * 640
    out = jax.eval_shape(lambda v, f: head.apply(v, f, train=False, output_size=(512, 512)), variables, feats)
    assert out.shape == (1, 512, 512, 2)
    small = [jnp.zeros((1, s, s, c)) for s, c in zip(SIZES, CHANS)]
    params = jax.jit(lambda f: nn.meta.unbox(head.init(jax.random.key(0, impl="rbg"), f, train=False)))(small)["params"]
    kernel = np.asarray(params["conv1_4"]["kernel"])
    bound = 1 / math.sqrt(9 * (16 + 16 + L))  # PyTorch default: U(+-1/sqrt(fan_in))
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
    assert "bias" not in params["conv2_3"] and "bias" in params["conv1_1"]

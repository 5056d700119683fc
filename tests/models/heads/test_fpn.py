"""Semantic FPN (mmseg FPN + FPNHead) against a PyTorch module written from
docs/reference.md, "Segmentation model and loss"."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.models.heads.torch_port import count, nchw, nhwc, perturb_, rel_err, shapes, torch_to_flax
from vpd_jax.models.heads.fpn import SemanticFPN


class ConvModule(torch.nn.Module):
    def __init__(self, cin, cout, k, norm=True, act=True):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2, bias=not norm)
        self.bn = torch.nn.BatchNorm2d(cout) if norm else None
        self.act = act

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x) if self.bn is not None else x
        return F.relu(x) if self.act else x


class TorchFPN(torch.nn.Module):
    def __init__(self, in_channels, out):
        super().__init__()
        self.lateral_convs = torch.nn.ModuleList(ConvModule(c, out, 1, False, False) for c in in_channels)
        self.fpn_convs = torch.nn.ModuleList(ConvModule(out, out, 3, False, False) for _ in in_channels)

    def forward(self, xs):
        lat = [conv(x) for conv, x in zip(self.lateral_convs, xs)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.fpn_convs, lat)]


class TorchFPNHead(torch.nn.Module):
    def __init__(self, channels, num_classes, strides, dropout):
        super().__init__()
        self.scale_heads = torch.nn.ModuleList()
        for s in strides:
            length = max(1, int(math.log2(s) - math.log2(strides[0])))
            layers = []
            for k in range(length):
                layers.append(ConvModule(channels, channels, 3))
                if s != strides[0]:
                    layers.append(torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(torch.nn.Sequential(*layers))
        self.dropout = torch.nn.Dropout2d(dropout)
        self.conv_seg = torch.nn.Conv2d(channels, num_classes, 1)

    def forward(self, xs):
        out = self.scale_heads[0](xs[0])
        for head, x in zip(self.scale_heads[1:], xs[1:]):
            out = out + F.interpolate(head(x), size=out.shape[2:], mode="bilinear", align_corners=False)
        return self.conv_seg(self.dropout(out))


class TorchSemanticFPN(torch.nn.Module):
    def __init__(self, in_channels, channels, num_classes, dropout=0.1):
        super().__init__()
        self.neck = TorchFPN(in_channels, channels)
        self.decode_head = TorchFPNHead(channels, num_classes, [4, 8, 16, 32], dropout)

    def forward(self, xs):
        return self.decode_head(self.neck(xs))


IN_CHANNELS = (8, 12, 14, 10)
SIZES = (16, 8, 4, 2)


def _features(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, s, s, c)).astype(np.float32) for s, c in zip(SIZES, IN_CHANNELS)]


def _ported(dropout=0.1, seed=0):
    torch.manual_seed(seed)
    ref = perturb_(TorchSemanticFPN(IN_CHANNELS, 16, 5, dropout), seed)
    head = SemanticFPN(num_classes=5, channels=16, dropout_ratio=dropout)
    feats = _features()
    ours = jax.eval_shape(lambda f: nn.meta.unbox(head.init(jax.random.key(0), f, train=False)),
                          [jnp.asarray(f) for f in feats])
    ported = torch_to_flax(ref)
    assert shapes(ported) == shapes(ours)
    return ref, head, ported, feats


def test_eval_matches_torch():
    ref, head, variables, feats = _ported()
    got = jax.jit(lambda v, f: head.apply(v, f, train=False))(variables, [jnp.asarray(f) for f in feats])
    want = nhwc(ref.eval()([nchw(f) for f in feats]))
    assert got.shape == (2, 16, 16, 5)
    assert rel_err(got, want) < 1e-4


def test_train_batch_statistics_match_torch():
    ref, head, variables, feats = _ported(dropout=0.0)
    got, updates = jax.jit(lambda v, f: head.apply(v, f, train=True, mutable=["batch_stats"]))(
        variables, [jnp.asarray(f) for f in feats])
    want = nhwc(ref.train()([nchw(f) for f in feats]))
    assert rel_err(got, want) < 1e-4
    updated = torch_to_flax(ref)["batch_stats"]
    for ours, theirs in zip(jax.tree.leaves(updates["batch_stats"]), jax.tree.leaves(updated)):
        assert rel_err(ours, theirs) < 1e-5


def test_dropout2d_drops_whole_channels():
    _, head, variables, feats = _ported(dropout=0.5)
    # conv_seg as the identity on 16 channels exposes the dropped activations
    head = SemanticFPN(num_classes=16, channels=16, dropout_ratio=0.5)
    variables["params"]["decode_head"]["conv_seg"] = {"kernel": jnp.eye(16)[None, None], "bias": jnp.zeros(16)}
    x = [jnp.asarray(f) for f in feats]
    train = lambda model, rngs=None: jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                                       rngs=rngs)[0])(variables, x)
    kept = train(SemanticFPN(16, 16, 0.0))
    dropped = train(head, {"dropout": jax.random.key(3)})
    kept, dropped = np.asarray(kept).reshape(2, -1, 16), np.asarray(dropped).reshape(2, -1, 16)
    zeroed = np.all(dropped == 0, axis=1)  # (example, channel): the whole map is dropped ...
    scaled = np.all(np.abs(dropped - 2 * kept) <= 1e-5 * np.abs(kept).max(), axis=1)  # ... or kept and x 1/(1-p)
    assert np.all(zeroed | scaled) and zeroed.any() and (scaled & ~zeroed).any()


def test_init_follows_mmseg():
    head = SemanticFPN(num_classes=150, channels=64)
    feats = [jnp.zeros((1, s, s, c)) for s, c in zip(SIZES, (32, 48, 40, 24))]
    params = jax.jit(lambda f: nn.meta.unbox(head.init(jax.random.key(1, impl="rbg"), f, train=False)))(feats)["params"]
    neck, dec = params["neck"], params["decode_head"]
    lat = np.asarray(neck["lateral_convs_1"]["conv"]["kernel"])
    bound = math.sqrt(6 / (48 + 64))
    assert np.abs(lat).max() <= bound and np.abs(lat).max() > 0.95 * bound
    assert not np.any(neck["fpn_convs_2"]["conv"]["bias"])
    k = np.asarray(dec["scale_heads_3_4"]["conv"]["kernel"])
    assert "bias" not in dec["scale_heads_3_4"]["conv"]
    assert abs(k.std() / math.sqrt(2 / (64 * 9)) - 1) < 0.05
    np.testing.assert_array_equal(dec["scale_heads_0_0"]["bn"]["scale"], np.ones(64, np.float32))
    assert abs(np.asarray(dec["conv_seg"]["kernel"]).std() / 0.01 - 1) < 0.05
    assert not np.any(dec["conv_seg"]["bias"])


def test_parameter_count_at_sd15_sizes():
    head = SemanticFPN(num_classes=150)
    feats = [jax.ShapeDtypeStruct((1, s, s, c), jnp.float32)
             for s, c in zip((64, 32, 16, 8), (320, 640 + 150, 1280 + 150, 1280))]
    variables = jax.eval_shape(lambda f: nn.meta.unbox(head.init(jax.random.key(0), f, train=False)), feats)
    neck = sum(c * 256 + 256 for c in (320, 790, 1430, 1280)) + 4 * (9 * 256 * 256 + 256)
    decode = 7 * (9 * 256 * 256 + 2 * 256) + 256 * 150 + 150  # 1+1+2+3 ConvModules, conv_seg
    assert count(variables["params"]["neck"]) == neck == 3_339_264
    assert count(variables["params"]["decode_head"]) == decode
    assert count(variables["batch_stats"]) == 7 * 2 * 256


def test_rejects_non_power_of_two_levels():
    head = SemanticFPN(num_classes=3, channels=8)
    feats = [jnp.zeros((1, s, s, 4)) for s in (16, 6)]
    with pytest.raises(ValueError, match=r"\(6, 6\)"):
        jax.eval_shape(lambda f: head.init(jax.random.key(0), f, train=False), feats)


def test_bfloat16_compute_keeps_float32_params():
    _, _, variables, feats = _ported()
    head = SemanticFPN(num_classes=5, channels=16, dtype=jnp.bfloat16)
    run = jax.jit(lambda v, f, model: model.apply(v, f, train=False), static_argnums=2)
    x = [jnp.asarray(f) for f in feats]
    low, full = run(variables, x, head), run(variables, x, SemanticFPN(num_classes=5, channels=16))
    assert low.dtype == jnp.bfloat16
    assert rel_err(np.asarray(low, np.float32), full) < 5e-2

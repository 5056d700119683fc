"""VPD depth head (fusion + deconv decoder + sigmoid*max_depth) against a PyTorch module from docs/reference.md,
"Depth model"."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.models.heads.torch_port import count, nchw, nhwc, perturb_, rel_err, shapes, torch_to_flax
from vpd_jax.models.heads.depth import DepthHead


class TorchFusion(torch.nn.Module):
    def __init__(self, c0, c1, c_rest, out):
        super().__init__()
        conv = lambda cin, cout, k, s: torch.nn.Conv2d(cin, cout, k, stride=s, padding=k // 2)
        self.layer1 = torch.nn.Sequential(conv(c0, c0, 3, 2), torch.nn.GroupNorm(16, c0), torch.nn.ReLU(),
                                          conv(c0, c0, 3, 2))
        self.layer2 = torch.nn.Sequential(conv(c1, c1, 3, 2))
        self.out_layer = torch.nn.Sequential(conv(c0 + c1 + c_rest, out, 1, 1), torch.nn.GroupNorm(16, out),
                                             torch.nn.ReLU())

    def forward(self, o):
        feats2 = torch.cat([o[2], F.interpolate(o[3], scale_factor=2)], dim=1)
        return self.out_layer(torch.cat([self.layer1(o[0]), self.layer2(o[1]), feats2], dim=1))


class TorchDecoder(torch.nn.Module):
    def __init__(self, cin, filters, out):
        super().__init__()
        layers = []
        for f in filters:
            layers += [torch.nn.ConvTranspose2d(cin, f, 2, stride=2, bias=False), torch.nn.BatchNorm2d(f),
                       torch.nn.ReLU()]
            cin = f
        self.deconv_layers = torch.nn.Sequential(*layers)
        self.conv_layers = torch.nn.Sequential(torch.nn.Conv2d(cin, out, 3, padding=1), torch.nn.BatchNorm2d(out),
                                               torch.nn.ReLU())
        self.up = torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x):
        return self.up(self.up(self.conv_layers(self.deconv_layers(x))))


class TorchDepthHead(torch.nn.Module):
    def __init__(self, chans, fusion, filters, out, max_depth=10.0):
        super().__init__()
        self.encoder = TorchFusion(chans[0], chans[1], chans[2] + chans[3], fusion)
        self.decoder = TorchDecoder(fusion, filters, out)
        self.last_layer_depth = torch.nn.Sequential(torch.nn.Conv2d(out, out, 3, padding=1), torch.nn.ReLU(),
                                                    torch.nn.Conv2d(out, 1, 3, padding=1))
        self.max_depth = max_depth

    def forward(self, feats, crop):
        x = self.encoder(feats)
        if crop:
            x = x[:, :, :-1, :-1]
        return torch.sigmoid(self.last_layer_depth(self.decoder(x))) * self.max_depth


CHANS, SIZES = (16, 16, 24, 8), (32, 16, 8, 4)
SETTINGS = dict(fusion_channels=32, num_filters=(8, 8, 8), decoder_channels=12)


def _ported(seed=0):
    torch.manual_seed(seed)
    ref = perturb_(TorchDepthHead(CHANS, 32, (8, 8, 8), 12), seed)
    with torch.no_grad():  # the reference init (N(0, 1e-3)) would make the output a constant 5 m
        for m in ref.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.weight.mul_(3.0)
    rng = np.random.default_rng(seed)
    feats = [rng.normal(size=(3, s, s, c)).astype(np.float32) for s, c in zip(SIZES, CHANS)]
    head = DepthHead(**SETTINGS)
    ours = jax.eval_shape(lambda f: nn.meta.unbox(head.init(jax.random.key(0), f, train=False)),
                          [jnp.asarray(f) for f in feats])
    variables = torch_to_flax(ref)
    assert shapes(variables) == shapes(ours)
    return ref, head, variables, feats


@pytest.mark.parametrize("crop", [False, True])
def test_eval_matches_torch(crop):
    ref, head, variables, feats = _ported()
    fusion_size = (7, 7) if crop else None  # the 8x8 s/32 map, last row and column dropped
    got = jax.jit(lambda v, f: head.apply(v, f, train=False, fusion_size=fusion_size))(
        variables, [jnp.asarray(f) for f in feats])
    want = nhwc(ref.eval()([nchw(f) for f in feats], crop))
    size = 224 if crop else 256  # (8 - crop) * 32
    assert got.shape == (3, size, size, 1)
    assert rel_err(got, want) < 1e-4
    assert 0 < float(got.min()) and float(got.max()) < 10 and float(got.std()) > 0.01


def test_train_batch_statistics_match_torch():
    ref, head, variables, feats = _ported(seed=1)
    got, updates = jax.jit(lambda v, f: head.apply(v, f, train=True, fusion_size=(7, 7), mutable=["batch_stats"]))(
        variables, [jnp.asarray(f) for f in feats])
    want = nhwc(ref.train()([nchw(f) for f in feats], True))
    assert rel_err(got, want) < 1e-4
    for ours, theirs in zip(jax.tree.leaves(updates["batch_stats"]), jax.tree.leaves(torch_to_flax(ref)["batch_stats"])):
        assert rel_err(ours, theirs) < 1e-5


def test_init_follows_reference():
    head = DepthHead(**SETTINGS)
    feats = [jnp.zeros((1, s, s, c)) for s, c in zip(SIZES, CHANS)]
    depth, variables = jax.jit(lambda f: head.init_with_output(jax.random.key(2, impl="rbg"), f, train=False))(feats)
    p = nn.meta.unbox(variables)["params"]
    fused = np.asarray(p["encoder"]["out_layer_0"]["kernel"])
    assert abs(fused.std() / 0.02 - 1) < 0.1 and not np.any(p["encoder"]["layer1_0"]["bias"])
    deconv = np.asarray(p["decoder"]["deconv_layers_0"]["kernel"])
    assert "bias" not in p["decoder"]["deconv_layers_0"] and abs(deconv.std() / 0.001 - 1) < 0.1
    assert abs(np.asarray(p["last_layer_depth_0"]["kernel"]).std() / 0.001 - 1) < 0.1
    np.testing.assert_array_equal(p["decoder"]["conv_layers_1"]["scale"], np.ones(12, np.float32))
    # sigmoid(~0) * 10: starts at 5 m everywhere (docs/reference.md, "Depth model")
    np.testing.assert_allclose(depth, 5.0, atol=0.05)


def test_parameter_count_at_sd15_sizes():
    head = DepthHead()
    feats = [jax.ShapeDtypeStruct((1, s, s, c), jnp.float32) for s, c in zip((64, 32, 16, 8), (320, 640, 1280, 1280))]
    variables = jax.eval_shape(lambda f: nn.meta.unbox(head.init(jax.random.key(0), f, train=False)), feats)
    fusion = (2 * (9 * 320 * 320 + 320) + 2 * 320  # layer1: two convs and a GN
              + 9 * 640 * 640 + 640  # layer2
              + 3520 * 1536 + 1536 + 2 * 1536)  # out_layer conv 1x1 + GN
    decoder = (1536 * 32 * 4 + 2 * 32 * 32 * 4 + 3 * 2 * 32  # three deconvs (no bias) + BN
               + 9 * 32 * 192 + 192 + 2 * 192)  # conv3x3 + BN
    last = 9 * 192 * 192 + 192 + 9 * 192 + 1
    assert count(variables["params"]["encoder"]) == fusion
    assert count(variables["params"]["decoder"]) == decoder
    assert count(variables["params"]) == fusion + decoder + last
    out = jax.eval_shape(lambda v, f: head.apply(v, f, train=False, fusion_size=(15, 15)), variables, feats)
    assert out.shape == (1, 480, 480, 1)
    out = jax.eval_shape(lambda v, f: head.apply(v, f, train=False, fusion_size=(15, 16)), variables, feats)
    assert out.shape == (1, 480, 512, 1)

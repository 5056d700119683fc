"""Optimizer: parameter groups vs the reference rules on ldm names, AdamW vs torch, schedules vs the reference
formulas, accumulation, EMA, clipping, config errors, state sharding."""
from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

from vpd_jax import parallel
from vpd_jax.models.unet import UNet2DConditionModel
from vpd_jax.models.unet_config import UNetConfig
from vpd_jax.run.optim import (PARAM_GROUPS, ParamRule, default_optim_config, ema_params, lr_scaled_by_batch,
                           make_optimizer, merge_params, trainable_mask)
from vpd_jax.run.param_groups import assign_groups, resolve_rules, split_params
from vpd_jax.weights.convert import torch_module_path
from vpd_jax.weights.ldm import unet_ldm_to_diffusers

# ------------------------------------------------------------------------------------------ a tiny VPD tree

# SD's block layout, scaled down: 3 levels, 2 layers per block, attention in the first two down / last two up.
TINY_UNET = UNetConfig(
    block_out_channels=(8, 16, 16), layers_per_block=(2, 2, 2), num_attention_heads=(2, 2, 2),
    cross_attention_dim=8, norm_num_groups=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
LAYERS = 2


def _shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@pytest.fixture(scope="module")
def unet_params():
    unet = UNet2DConditionModel(TINY_UNET)
    variables = jax.eval_shape(lambda: unet.init(jax.random.key(0), *unet.dummy_inputs()))
    return _shapes(nn.meta.unbox(variables)["params"])


# Our path -> (shape, the reference's name without its task prefix). Names chosen to test the rules: the VAE's
# `norm_out` contains "norm", CLIP's `layer_norm1` too, the head's BN and biases do not (docs/reference.md,
# "Segmentation optimiser").
DUMMY = {
    "vae/encoder/conv_in/kernel": ((3, 3, 3, 8), "encoder_vq.encoder.conv_in.weight"),
    "vae/encoder/conv_norm_out/scale": ((8,), "encoder_vq.encoder.norm_out.weight"),
    "vae/quant_conv/bias": ((8,), "encoder_vq.quant_conv.bias"),
    "text_adapter/fc_0/kernel": ((8, 8), "text_adapter.fc.0.weight"),
    "text_adapter/fc_0/bias": ((8,), "text_adapter.fc.0.bias"),
    "text_adapter/gamma": ((8,), "gamma"),
    "head/neck/lateral_convs_0/kernel": ((1, 1, 8, 8), "neck.lateral_convs.0.conv.weight"),
    "head/decode_head/conv/kernel": ((3, 3, 8, 8), "decode_head.conv.weight"),
    "head/decode_head/bn/scale": ((8,), "decode_head.bn.weight"),
    "head/decode_head/bn/bias": ((8,), "decode_head.bn.bias"),
    "head/decode_head/conv_seg/bias": ((4,), "decode_head.conv_seg.bias"),
}
CLIP_DUMMY = {
    "text_encoder/text_model/encoder/layers_0/layer_norm1/scale":
        ((8,), "text_encoder.transformer.text_model.encoder.layers.0.layer_norm1.weight"),
    "text_encoder/text_model/encoder/layers_0/self_attn/q_proj/kernel":
        ((8, 8), "text_encoder.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"),
}
# Illustrative module prefixes of the UNet in each reference model; only the substrings the rules test matter.
UNET_PREFIX = {"vpd_seg": "unet.unet.diffusion_model.", "vpd_depth": "encoder.unet.unet.diffusion_model.",
               "vpd_refer": "backbone.unet.unet.diffusion_model."}


def ldm_unet_name(path: tuple[str, ...]) -> str:
    """Our UNet param path -> CompVis ldm state-dict key, written independently of vpd_jax.weights.ldm."""
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    top = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
           "time_embedding/linear_1": "time_embed.0", "time_embedding/linear_2": "time_embed.2"}
    *modules, leaf = path
    leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    name = "/".join(modules)
    for ours, theirs in top.items():
        if name == ours:
            return f"{theirs}.{leaf}"

    def dotted(parts):
        return ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in parts)

    block, *rest = modules
    kind, index = (rest[0].rsplit("_", 1) + [None])[:2] if rest else (None, None)
    inner = rest[1:]
    if kind == "resnets":
        inner = [resnet.get(inner[0], inner[0])] + inner[1:]
    if m := re.fullmatch(r"down_blocks_(\d+)", block):
        i = int(m[1])
        if kind == "downsamplers":
            return f"input_blocks.{(i + 1) * (LAYERS + 1)}.0.op.{leaf}"
        n = 1 + i * (LAYERS + 1) + int(index)
        return f"input_blocks.{n}.{0 if kind == 'resnets' else 1}.{dotted(inner)}.{leaf}"
    if block == "mid_block":
        part = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(kind, index)]
        return f"middle_block.{part}.{dotted(inner)}.{leaf}"
    if m := re.fullmatch(r"up_blocks_(\d+)", block):
        i = int(m[1])
        if kind == "upsamplers":
            has_attention = TINY_UNET.up_block_types[i].startswith("CrossAttn")
            return f"output_blocks.{i * (LAYERS + 1) + LAYERS}.{2 if has_attention else 1}.conv.{leaf}"
        n = i * (LAYERS + 1) + int(index)
        return f"output_blocks.{n}.{0 if kind == 'resnets' else 1}.{dotted(inner)}.{leaf}"
    raise AssertionError(f"no ldm name for {path}")


def test_ldm_names_round_trip_through_the_project_mapping(unet_params):
    """The test's own inverse mapping agrees with vpd_jax.weights.ldm (ldm -> diffusers) on every UNet param."""
    paths = list(flatten_dict(unet_params))
    ldm = {ldm_unet_name(p): np.zeros(1) for p in paths}
    assert len(ldm) == len(paths)
    renamed, _ = unet_ldm_to_diffusers(ldm)
    back = set()
    for key in renamed:
        modules, leaf = torch_module_path(key)
        back.add((modules, leaf))
    ours = {(p[:-1], {"kernel": "weight", "scale": "weight"}.get(p[-1], p[-1])) for p in paths}
    assert back == ours


def vpd_tree(unet_params, task):
    flat = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, (s, _) in DUMMY.items()}
    names = {k: n for k, (_, n) in DUMMY.items()}
    if task == "vpd_refer":
        flat.update({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, (s, _) in CLIP_DUMMY.items()})
        names.update({k: n for k, (_, n) in CLIP_DUMMY.items()})
    for path, leaf in flatten_dict(unet_params).items():
        key = "unet/" + "/".join(path)
        flat[key] = leaf
        names[key] = UNET_PREFIX[task] + ldm_unet_name(path)
    tree = unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    return tree, names


# ---------------------------------------------------------------------- the reference rules, on reference names

def _no_grad(name: str) -> bool:
    """Params the reference never updates: the VAE and CLIP (requires_grad False) and the UNet's `out` head, which
    VPD's forward never applies (no gradient, so torch AdamW skips it, decay included; depth deletes it).
    docs/reference.md, "VPD backbone", "Segmentation optimiser", "Referring loss and optimiser",
    "AdamW and parameter groups"."""
    return ("encoder_vq" in name or "text_encoder" in name
            or re.search(r"diffusion_model\.out\.[02]\.", name) is not None)


def reference_seg(name: str, ndim: int):
    """mmcv 1.6 DefaultOptimizerConstructor with VPD's custom_keys (docs/reference.md, "Segmentation optimiser")."""
    if _no_grad(name):
        return "frozen"
    custom = {"unet": dict(lr_mult=0.1), "encoder_vq": dict(lr_mult=0.0), "text_encoder": dict(lr_mult=0.0),
              "norm": dict(decay_mult=0.0)}
    for key in sorted(sorted(custom), key=len, reverse=True):  # longest first, ties alphabetical
        if key in name:
            return custom[key].get("lr_mult", 1.0), custom[key].get("decay_mult", 1.0)
    return 1.0, 1.0


def reference_depth(name: str, ndim: int):
    """VPD depth's LDMOptimizerConstructor (docs/reference.md, "Depth optimiser")."""
    if _no_grad(name):
        return "frozen"
    lr = 0.01 if "unet" in name else 1.0
    wd = 0.0 if ndim == 1 or name.endswith(".bias") else 1.0
    return lr, wd


def reference_refer(name: str, ndim: int):
    """VPD refer's ordered groups; their lr_scale is ignored by torch
    (docs/reference.md, "Referring loss and optimiser")."""
    if _no_grad(name):
        return "frozen"
    if "unet" in name and "norm" in name:
        return 1.0, 0.0
    if "unet" in name:
        return 1.0, 1.0
    if "norm" in name:
        return 1.0, 0.0
    return 1.0, 1.0


REFERENCE = {"vpd_seg": reference_seg, "vpd_depth": reference_depth, "vpd_refer": reference_refer}


def ours(group):
    return "frozen" if group.frozen else (group.lr_mult, group.wd_mult)


@pytest.mark.parametrize("task", ["vpd_seg", "vpd_depth", "vpd_refer"])
def test_presets_match_the_reference_rules_on_ldm_names(unet_params, task):
    tree, names = vpd_tree(unet_params, task)
    groups = assign_groups(tree, PARAM_GROUPS[task])
    shapes = {"/".join(p): len(v.shape) for p, v in flatten_dict(tree).items()}
    table = {path: (ours(g), REFERENCE[task](names[path], shapes[path])) for path, g in groups.items()}
    wrong = [f"{path} ({names[path]}): ours {a}, reference {b}" for path, (a, b) in table.items() if a != b]
    assert not wrong, f"{len(wrong)} of {len(table)} params differ:\n" + "\n".join(wrong)
    assert len(table) == len(flatten_dict(tree))


def test_seg_groups_by_parameter(unet_params):
    """Spot checks of docs/reference.md, "Segmentation optimiser", on our names, including each category the
    reference rule distinguishes."""
    tree, _ = vpd_tree(unet_params, "vpd_seg")
    groups = {k: ours(g) for k, g in assign_groups(tree, PARAM_GROUPS["vpd_seg"]).items()}
    expected = {
        "unet/down_blocks_0/attentions_1/norm/scale": (1.0, 0.0),  # SpatialTransformer GroupNorm: "norm"
        "unet/mid_block/attentions_0/transformer_blocks_0/norm3/bias": (1.0, 0.0),  # LayerNorm: "norm"
        "unet/up_blocks_2/attentions_2/transformer_blocks_0/norm1/scale": (1.0, 0.0),
        "unet/down_blocks_0/resnets_0/norm1/scale": (0.1, 1.0),  # ldm in_layers.0: not "norm"
        "unet/up_blocks_1/resnets_2/norm2/bias": (0.1, 1.0),  # ldm out_layers.0
        "unet/down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_q/kernel": (0.1, 1.0),
        "unet/time_embedding/linear_1/bias": (0.1, 1.0),
        "unet/conv_in/kernel": (0.1, 1.0),
        "unet/conv_norm_out/scale": "frozen",  # ldm out.0: never applied, no gradient
        "unet/conv_out/kernel": "frozen",
        "vae/encoder/conv_norm_out/scale": "frozen",
        "text_adapter/gamma": (1.0, 1.0),
        "text_adapter/fc_0/bias": (1.0, 1.0),
        "head/decode_head/bn/scale": (1.0, 1.0),  # BN and biases are decayed in seg
        "head/decode_head/conv_seg/bias": (1.0, 1.0),
    }
    assert {k: groups[k] for k in expected} == expected
    unet_norms = [k for k, g in groups.items() if k.startswith("unet/") and g == (1.0, 0.0)]
    # 2 + 2 down, 1 mid, 3 + 3 up SpatialTransformers; each: norm + norm1..3, scale and bias.
    assert len(unet_norms) == 11 * 4 * 2


def test_ldznet_preset_freezes_the_feature_extractors(unet_params):
    tree = {"vae": {"k": jax.ShapeDtypeStruct((2, 2), jnp.float32)},
            "text_encoder": {"norm": {"scale": jax.ShapeDtypeStruct((2,), jnp.float32)}},
            "sd_unet": unet_params,
            "znet": {**unet_params, "attn_pool_0": {"pos_emb": jax.ShapeDtypeStruct((5, 16), jnp.float32)}},
            "head": {"conv": {"bias": jax.ShapeDtypeStruct((1,), jnp.float32)}}}
    groups = assign_groups(tree, PARAM_GROUPS["ldznet"])
    for path, group in groups.items():
        frozen = path.split("/")[0] in ("vae", "text_encoder", "sd_unet")
        assert ours(group) == ("frozen" if frozen else (1.0, 1.0)), path


# --------------------------------------------------------------------------------------- rules and config errors

def test_rule_errors():
    tree = {"unet": {"a": {"kernel": jnp.zeros((2, 2))}}, "head": {"bias": jnp.zeros(2)}}
    with pytest.raises(ValueError, match=r"(?s)match no parameter.*\^unet/typo"):
        assign_groups(tree, [ParamRule("^unet/typo")])
    assign_groups(tree, [ParamRule("^unet/typo", required=False)])
    with pytest.raises(ValueError, match="invalid regex"):
        ParamRule("unet/(")
    with pytest.raises(ValueError, match="frozen=True"):
        ParamRule("^vae/", lr_mult=0.0)
    with pytest.raises(ValueError, match="unknown param_groups preset 'vpd_sge'"):
        resolve_rules("vpd_sge")
    cfg = default_optim_config("vpd_seg")
    cfg.param_groups = "vpd_sge"
    with pytest.raises(ValueError, match="unknown param_groups preset 'vpd_sge'.*vpd_seg"):
        make_optimizer(cfg, tree, 10)
    cfg = default_optim_config("vpd_seg")
    cfg.param_groups = [dict(pattern="^head/", lr_multt=2.0)]
    with pytest.raises(ValueError, match=r"unknown fields \['lr_multt'\]"):
        make_optimizer(cfg, tree, 10)
    cfg.param_groups = [dict(pattern=".*", frozen=True)]
    with pytest.raises(ValueError, match="freeze every parameter"):
        make_optimizer(cfg, tree, 10)


def test_config_errors():
    tree = {"head": {"bias": jnp.zeros(2)}}
    cfg = default_optim_config("vpd_refer")
    cfg.schedule.name = "polynomial"
    with pytest.raises(ValueError, match="unknown lr schedule 'polynomial'.*'poly'"):
        make_optimizer(cfg, tree, 10)
    cfg = default_optim_config("vpd_depth")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make_optimizer(cfg, tree, 10)
    with pytest.raises(ValueError, match="unknown task 'seg'"):
        default_optim_config("seg")
    cfg = default_optim_config("vpd_refer")
    cfg.unlock()
    cfg.learning_rate = 1.0
    with pytest.raises(ValueError, match=r"unknown fields \['learning_rate'\]"):
        make_optimizer(cfg, tree, 10)
    cfg = default_optim_config("vpd_refer")
    cfg.lock()
    with pytest.raises(TypeError):
        cfg.lr = "abc"
    with pytest.raises(AttributeError):
        cfg.lrr = 1.0


def test_default_configs():
    expected = {"vpd_seg": (8e-5, 1e-3, "poly", "vpd_seg"), "vpd_depth": (5e-4, 0.1, "vpd_depth_ramp", "vpd_depth"),
                "vpd_refer": (5e-5, 1e-2, "poly", "vpd_refer"), "ldznet": (32 * 5e-7, 1e-2, "constant", "ldznet"),
                "probe": (1e-3, 0.0, "constant", "probe")}
    for task, (lr, wd, schedule, groups) in expected.items():
        cfg = default_optim_config(task)
        assert (cfg.lr, cfg.weight_decay, cfg.schedule.name, cfg.param_groups) == (lr, wd, schedule, groups)
        assert (cfg.b1, cfg.b2, cfg.eps) == (0.9, 0.999, 1e-8)
    assert default_optim_config("ldznet", global_batch=8).lr == pytest.approx(4e-6)
    assert default_optim_config("ldznet").ema_decay == 0.9999
    assert default_optim_config("vpd_seg").schedule.warmup_steps == 1500
    assert lr_scaled_by_batch(5e-7, 4) == pytest.approx(2e-6)


# ----------------------------------------------------------------------------------------------- AdamW vs torch

def mmcv_poly_warmup(it, total, base, power=1.0, min_lr=0.0, warmup=0, ratio=1e-6):
    """mmcv PolyLrUpdaterHook + linear warmup, transcribed (docs/reference.md, "Segmentation optimiser")."""
    regular = (base - min_lr) * (1 - it / total) ** power + min_lr
    if warmup and it < warmup:
        return regular * (1 - (1 - it / warmup) * (1 - ratio))
    return regular


def test_adamw_with_groups_matches_torch():
    rng = np.random.default_rng(0)
    shapes = {"unet/block/kernel": (3, 4), "unet/attentions_0/norm/scale": (4,), "head/kernel": (4, 2),
              "head/bias": (2,), "vae/kernel": (2, 2)}
    init = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    params = unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in init.items()})
    cfg = default_optim_config("vpd_seg")
    cfg.lr, cfg.weight_decay, cfg.b1, cfg.b2 = 1e-2, 0.05, 0.8, 0.95
    cfg.schedule.warmup_steps = 3
    cfg.param_groups = [dict(pattern="^vae/", frozen=True), dict(pattern="^unet/attentions_0/norm/", wd_mult=0.0),
                        dict(pattern="^unet/", lr_mult=0.1, wd_mult=2.0)]
    total, steps = 10, 6
    tx, info = make_optimizer(cfg, params, total)
    trainable, frozen = info.split(params)
    assert "vae" not in trainable and "vae" in frozen
    state = tx.init(trainable)
    assert not any("vae" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0])

    mults = {"unet/block/kernel": (0.1, 2.0), "unet/attentions_0/norm/scale": (1.0, 0.0), "head/kernel": (1.0, 1.0),
             "head/bias": (1.0, 1.0)}
    torch_params = {k: torch.nn.Parameter(torch.tensor(init[k])) for k in mults}
    opt = torch.optim.AdamW([dict(params=[torch_params[k]], lr=cfg.lr * m[0], weight_decay=cfg.weight_decay * m[1])
                             for k, m in mults.items()], betas=(0.8, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: mmcv_poly_warmup(it, total, 1.0, power=1.0, warmup=3, ratio=1e-6))
    update = jax.jit(tx.update)
    for step in range(steps):
        grads = {k: rng.normal(size=shapes[k]).astype(np.float32) * 10 ** (step % 3 - 1) for k in mults}
        for k, p in torch_params.items():
            p.grad = torch.tensor(grads[k])
        opt.step()
        sched.step()
        g = unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in grads.items()})
        updates, state = update(g, state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        for k, p in torch_params.items():
            ours_ = np.asarray(flatten_dict(trainable)[tuple(k.split("/"))])
            np.testing.assert_allclose(ours_, p.detach().numpy(), rtol=2e-6, atol=1e-7, err_msg=f"{k} step {step}")
    assert not np.allclose(np.asarray(trainable["head"]["bias"]), init["head/bias"])


# ------------------------------------------------------------------------------------------------- schedules

def _schedule(task, total, steps_per_epoch=None, **overrides):
    cfg = default_optim_config(task)
    cfg.param_groups = "all"
    for k, v in overrides.items():
        setattr(cfg.schedule, k, v)
    _, info = make_optimizer(cfg, {"head": {"bias": jnp.zeros(1)}}, total, steps_per_epoch)
    return cfg, info.learning_rate


def test_seg_schedule_is_mmcv_poly_with_linear_warmup():
    cfg, lr = _schedule("vpd_seg", 80000)
    for it in [0, 1, 100, 1499, 1500, 1501, 40000, 79999, 80000]:
        assert float(lr(it)) == pytest.approx(mmcv_poly_warmup(it, 80000, 8e-5, warmup=1500, ratio=1e-6),
                                              rel=1e-5, abs=1e-14), it
    assert float(lr(0)) == pytest.approx(8e-5 * 1e-6, rel=1e-5)


def depth_reference(s, iters_per_epoch, epochs, max_lr=5e-4, min_lr=3e-5):
    """docs/reference.md, "Depth optimiser", transcribed; s is the reference's global step (from 1)."""
    half = iters_per_epoch * (epochs // 2)
    if s < half:
        return (max_lr - min_lr) * (s / half) ** 0.9 + min_lr
    return max(min_lr, max_lr - (max_lr - min_lr) * (s / half - 1) ** 0.9)


def test_depth_ramp_matches_the_reference_with_steps_from_one():
    per_epoch, epochs = 40, 25
    _, lr = _schedule("vpd_depth", per_epoch * epochs, per_epoch)
    half = per_epoch * 12
    for count in [0, 1, 200, half - 2, half - 1, half, half + 100, 2 * half - 1, 2 * half, per_epoch * epochs - 1]:
        assert float(lr(count)) == pytest.approx(depth_reference(count + 1, per_epoch, epochs), rel=1e-5), count
    assert float(lr(half - 1)) == pytest.approx(5e-4, rel=1e-6)  # s = H: the peak
    assert float(lr(2 * half - 1)) == pytest.approx(3e-5, rel=1e-6)  # s = 2H: back at min, for all of epoch 25
    with pytest.raises(ValueError, match="whole number of epochs"):
        _schedule("vpd_depth", 1001, 40)


def test_refer_schedule_is_poly_09_without_warmup():
    total = 40 * 7
    _, lr = _schedule("vpd_refer", total)
    for it in [0, 1, 100, total - 1, total]:
        assert float(lr(it)) == pytest.approx(5e-5 * (1 - it / total) ** 0.9, rel=1e-5, abs=1e-14), it


def test_constant_and_cosine_schedules():
    _, lr = _schedule("ldznet", 100)
    assert np.allclose(np.asarray(lr(jnp.arange(5))), 32 * 5e-7)
    _, lr = _schedule("vpd_refer", 100, name="cosine", min_lr=1e-6, warmup_steps=10, warmup_ratio=0.1)
    for it in [0, 5, 10, 50, 99, 100, 150]:
        regular = 1e-6 + 0.5 * (5e-5 - 1e-6) * (1 + math.cos(math.pi * min(it, 100) / 100))
        factor = 1 - (1 - it / 10) * (1 - 0.1) if it < 10 else 1.0
        assert float(lr(it)) == pytest.approx(regular * factor, rel=1e-5), it


# ------------------------------------------------------------------------ accumulation, EMA, clipping, sharding

def _linear_problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {"head": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                       "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}
    x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)

    def loss(p, xb, yb):
        return jnp.mean((xb @ p["head"]["kernel"] + p["head"]["bias"] - yb) ** 2)

    return params, x, y, loss


def _config(**fields):
    cfg = default_optim_config("vpd_refer")
    cfg.param_groups = "all"
    cfg.lr = 0.1
    for k, v in fields.items():
        setattr(cfg, k, v)
    return cfg


def test_accumulated_micro_batches_equal_one_big_batch():
    params, x, y, loss = _linear_problem()
    # A large eps makes Adam sensitive to the gradient scale, so summing instead of averaging would show.
    big_tx, _ = make_optimizer(_config(eps=0.5), params, 10)
    acc_tx, info = make_optimizer(_config(eps=0.5, grad_accum_steps=4), params, 10)
    big, acc = params, params
    big_state, acc_state = big_tx.init(big), acc_tx.init(acc)
    grad, big_update, acc_update = jax.jit(jax.grad(loss)), jax.jit(big_tx.update), jax.jit(acc_tx.update)
    for _ in range(2):
        updates, big_state = big_update(grad(big, x, y), big_state, big)
        big = optax.apply_updates(big, updates)
        for k in range(4):
            before = acc
            g = grad(acc, x[2 * k:2 * k + 2], y[2 * k:2 * k + 2])
            updates, acc_state = acc_update(g, acc_state, acc)
            acc = optax.apply_updates(acc, updates)
            if k < 3:
                assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), acc, before))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), acc, big)
    assert float(info.lr_at_step(7)) == pytest.approx(float(info.learning_rate(1)))


def test_ema_of_params():
    params, x, y, loss = _linear_problem()
    tx, _ = make_optimizer(_config(ema_decay=0.9), params, 10)
    plain_tx, _ = make_optimizer(_config(), params, 10)
    state, plain_state = tx.init(params), plain_tx.init(params)
    assert ema_params(plain_state) is None
    expected, p, q = params, params, params
    for _ in range(3):
        updates, state = tx.update(jax.grad(loss)(p, x, y), state, p)
        p = optax.apply_updates(p, updates)
        plain_updates, plain_state = plain_tx.update(jax.grad(loss)(q, x, y), plain_state, q)
        q = optax.apply_updates(q, plain_updates)
        expected = jax.tree.map(lambda e, new: 0.9 * e + 0.1 * new, expected, p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p, q)  # the EMA does not change updates
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ema_params(state), expected)

    warm_tx, _ = make_optimizer(_config(ema_decay=0.9999, ema_warmup=True), params, 10)
    warm_state = warm_tx.init(params)
    updates, warm_state = warm_tx.update(jax.grad(loss)(params, x, y), warm_state, params)
    new = optax.apply_updates(params, updates)
    rate = 2 / 11  # CompVis LitEma: min(decay, (1 + n) / (10 + n)) with n = 1 at the first update
    jax.tree.map(lambda e, p0, p1: np.testing.assert_allclose(e, rate * p0 + (1 - rate) * p1, rtol=1e-6),
                 ema_params(warm_state), params, new)


def test_clipping_scales_gradients_above_the_max_norm_only():
    params, _, _, _ = _linear_problem()
    big = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)  # norm sqrt(8) * 3 > 1
    small = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)  # norm < 1: untouched
    norm = float(optax.tree.norm(big))

    def run(cfg, grads):
        tx, _ = make_optimizer(cfg, params, 10)
        p, state = params, tx.init(params)
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return p

    clipped = run(_config(clip_grad_norm=1.0), [big, small])
    by_hand = run(_config(), [jax.tree.map(lambda g: g / norm, big), small])
    unclipped = run(_config(), [big, small])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), clipped, by_hand)
    assert not np.allclose(clipped["head"]["kernel"], unclipped["head"]["kernel"])


def test_optimizer_state_takes_the_param_shardings():
    """eval_shape of tx.init on logically-boxed trainable params gives state leaves with the params' logical axes."""
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    boxed = {"unet": {"to_q": {"kernel": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((8, 16), jnp.float32),
                                                                 ("embed", "heads"))}},
             "vae": {"conv": {"kernel": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32),
                                                                ("conv_h", "conv_w", "conv_in", "conv_out"))}}}
    cfg = default_optim_config("vpd_seg")
    cfg.param_groups = [dict(pattern="^vae/", frozen=True)]
    cfg.ema_decay = 0.99
    cfg.grad_accum_steps = 2
    tx, info = make_optimizer(cfg, boxed, 100)
    trainable, _ = info.split(boxed)
    state_shardings = parallel.logical_to_shardings(jax.eval_shape(tx.init, trainable), mesh)
    param_sharding = parallel.logical_to_shardings(trainable, mesh)["unet"]["to_q"]["kernel"]
    assert param_sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    per_param = [s for path, s in jax.tree_util.tree_flatten_with_path(state_shardings)[0]
                 if "to_q" in jax.tree_util.keystr(path)]
    assert len(per_param) == 4  # Adam mu and nu, accumulated gradients, EMA
    assert all(s == param_sharding for s in per_param)
    state = jax.jit(lambda t: tx.init(nn.meta.unbox(t)), out_shardings=state_shardings)(
        jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), trainable))
    assert ema_params(state)["unet"]["to_q"]["kernel"].sharding == param_sharding


def test_split_and_merge_round_trip():
    params = {"vae": {"k": jnp.ones(2)}, "unet": {"a": jnp.ones(3), "b": {"c": jnp.zeros(1)}}}
    mask = trainable_mask(params, [ParamRule("^vae/", frozen=True), ParamRule("^unet/b/", frozen=True)])
    trainable, frozen = split_params(params, mask)
    assert set(flatten_dict(trainable)) == {("unet", "a")}
    assert set(flatten_dict(frozen)) == {("vae", "k"), ("unet", "b", "c")}
    assert jax.tree.structure(merge_params(trainable, frozen)) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="unet/a"):
        merge_params(trainable, trainable)

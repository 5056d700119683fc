"""VPD's released task models, end to end (slow: each task builds, imports and compiles a tiny model): a tiny
PyTorch model with the original's module names and forward order (tests/helpers/original_vpd.py) is saved in the
released file's container, imported into a run directory
(vpd_jax/apps/import_released.py), restored as eval.py restores it, and run through our model on the same inputs.
Outputs, the four features and their attention maps agree within 1e-4 (relative to the largest value). A swapped
key breaks that agreement; every key on the drop list is unused by the original (NaN there changes nothing)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np
import pytest
import torch

from tests.helpers import original_vpd as orig
from vpd_jax.apps.import_released import import_released
from vpd_jax.run.config import base_config
from vpd_jax.run.setup import setup
from vpd_jax.run.start import restore_step
from vpd_jax.weights import WeightLoadingError
from vpd_jax.weights.released import convert_released, read_released

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4
NUM_CLASSES, NUM_SCENES, TOKENS = 6, 5, 7
TEXT_DIM = orig.TINY.unet.cross_attention_dim


def rel_err(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@dataclasses.dataclass
class Case:
    """One task's original, its file, the imported run and our jitted forward (model variables -> outputs)."""

    task: str
    reference: torch.nn.Module
    file: str
    file_state: dict
    config: Any
    run: Any
    variables: dict
    forward: Callable  # variables -> (output, features or None)
    torch_forward: Callable  # () -> (output NHWC numpy, features NHWC numpy list or None)
    expected: tuple


def _config(task: str, **model):
    c = base_config(task, "vpd_shapes/small")
    c.model.arch = "tiny"
    c.steps_per_epoch = 1  # depth's epoch-based schedule needs one
    for key, value in model.items():
        c.model[key] = value
    return c


def _import(task, reference, file, config, workdir, torch_forward, forward_fn) -> Case:
    imported = import_released(config, file, workdir)
    run = setup(imported.config)
    state, step = restore_step(run.trainer, os.path.join(workdir, "checkpoints"))
    assert step == 0
    variables = jax.device_get(run.trainer.variables(state))
    forward = jax.jit(lambda v: forward_fn(run.task, v))
    return Case(task, reference, file, read_released(file, task), imported.config, run, variables, forward,
                torch_forward, torch_forward())


def _images(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)


def _seg_case(tmp) -> Case:
    embeddings = torch.randn(NUM_CLASSES, TEXT_DIM, generator=torch.Generator().manual_seed(3))
    reference = orig.VPDSeg(NUM_CLASSES, embeddings, fpn_channels=16, base_size=64)
    file = str(tmp / "vpd_seg.pth")
    orig.save_seg(reference, file)
    images = _images(64)

    def torch_forward():
        with torch.no_grad():
            logits, feats = reference(orig.nchw(images))
        return orig.nhwc(logits), [orig.nhwc(f) for f in feats]

    def forward(task, variables):
        logits, state = task.model.apply(variables, images, task.constants["class_embeddings"], train=False,
                                         mutable=["intermediates"])
        return logits, list(state["intermediates"]["features"][0])

    config = _config("seg", num_classes=NUM_CLASSES, fpn_channels=16)
    return _import("seg", reference, file, config, str(tmp / "run_seg"), torch_forward, forward)


def _depth_case(tmp) -> Case:
    embeddings = torch.randn(NUM_SCENES, TEXT_DIM, generator=torch.Generator().manual_seed(4))
    reference = orig.VPDDepth(embeddings, fusion_channels=32, num_filters=(8, 8, 8), decoder_channels=16)
    file = str(tmp / "vpd_depth.ckpt")
    orig.save_depth(reference, file)
    images01 = (_images(96, seed=1) + 1) / 2  # the original takes [0, 1] and normalises; 96 = 3 x 32 is padded
    class_ids = np.array([1, 3], np.int32)

    def torch_forward():
        with torch.no_grad():
            depth = reference(orig.nchw(images01), torch.from_numpy(class_ids).long())
        return orig.nhwc(depth)[..., 0], [orig.nhwc(f) for f in reference.encoder.features]

    def forward(task, variables):
        depth, state = task.model.apply(variables, images01 * 2 - 1, class_ids, task.constants["class_embeddings"],
                                        train=False, mutable=["intermediates"])
        return depth, list(state["intermediates"]["features"][0])

    config = _config("depth", num_classes=NUM_SCENES, depth_fusion_channels=32, depth_num_filters=(8, 8, 8),
                     depth_decoder_channels=16)
    return _import("depth", reference, file, config, str(tmp / "run_depth"), torch_forward, forward)


def _refer_case(tmp) -> Case:
    reference = orig.VPDRefer(TOKENS, base_size=64)
    clip = orig.tiny_clip(seed=5)
    clip.save_pretrained(str(tmp / "clip"), safe_serialization=True)
    file = str(tmp / "model_best_refcoco.pth")
    orig.save_refer(reference, file, TOKENS)
    images = _images(64, seed=2)
    token_ids = np.random.default_rng(6).integers(0, orig.TINY.text.vocab_size, (2, TOKENS)).astype(np.int32)

    def torch_forward():
        with torch.no_grad():
            l_feats = clip(input_ids=torch.from_numpy(token_ids).long()).last_hidden_state
            logits, feats = reference(orig.nchw(images), l_feats)
        return orig.nhwc(logits), [orig.nhwc(f) for f in feats]

    def forward(task, variables):
        logits, state = task.model.apply(variables, images, token_ids, train=False, mutable=["intermediates"])
        return logits, list(state["intermediates"]["features"][0])

    config = _config("refer", tokenizer="hash", text_encoder=str(tmp / "clip"))
    config.data.text_max_length = TOKENS
    return _import("refer", reference, file, config, str(tmp / "run_refer"), torch_forward, forward)


CASES = {"seg": _seg_case, "depth": _depth_case, "refer": _refer_case}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    return CASES[request.param](tmp_path_factory.mktemp(request.param))


def test_outputs_features_and_attention_maps_match_the_original(case):
    (output, features), (expected, expected_features) = case.forward(case.variables), case.expected
    assert rel_err(output, expected) <= TOLERANCE
    if expected_features is not None:
        for ours, theirs in zip(features, expected_features, strict=True):
            assert rel_err(ours, theirs) <= TOLERANCE
    attention = {"seg": NUM_CLASSES, "refer": TOKENS}.get(case.task)
    if attention:  # the maps are the last channels of levels 1 and 2: nonzero probabilities over the tokens
        maps = np.asarray(features[1][..., -attention:])
        np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)


def _converted(case, state) -> dict:
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), case.variables)
    variables, _ = convert_released(state, case.task, target, source=case.file)
    for subtree in ("text_encoder",):  # refer: not in the file, from the CLIP folder
        if subtree in case.variables["params"]:
            variables["params"][subtree] = case.variables["params"][subtree]
    return variables


SWAPS = {  # two same-shaped tensors of the file's head (the UNet's are in UNET_SWAP)
    "seg": ("decode_head.scale_heads.1.0.conv.weight", "decode_head.scale_heads.2.0.conv.weight"),
    "depth": ("decoder.deconv_layers.3.weight", "decoder.deconv_layers.6.weight"),
    "refer": ("classifier.conv2_4.weight", "classifier.conv2_3.weight"),
}
UNET_SWAP = ("input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight",
             "input_blocks.3.1.transformer_blocks.0.attn1.to_k.weight")


@pytest.mark.parametrize("which", ["head", "unet"])
def test_a_swapped_key_breaks_parity(case, which):
    prefix = "encoder." if case.task == "depth" else ""
    a, b = SWAPS[case.task] if which == "head" else (f"{prefix}unet.unet.diffusion_model.{k}" for k in UNET_SWAP)
    state = dict(case.file_state)
    assert state[a].shape == state[b].shape
    state[a], state[b] = state[b], state[a]
    output, features = case.forward(_converted(case, state))
    errors = [rel_err(output, case.expected[0])] + [rel_err(f, e) for f, e in zip(features, case.expected[1])]
    assert max(errors) > 10 * TOLERANCE


def test_dropped_keys_are_unused_by_the_original(case):
    """Every key the import drops is NaN in the original model, whose outputs do not change; the import of that
    file gives the same variables."""
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), case.variables)
    _, mapped = convert_released(case.file_state, case.task, target, source=case.file)
    nan_state = {k: (np.full_like(v, np.nan) if k in mapped.dropped and v.dtype.kind == "f" else v)
                 for k, v in case.file_state.items()}
    converted = _converted(case, nan_state)
    jax.tree.map(np.testing.assert_array_equal, converted, case.variables)

    reference_state = case.reference.state_dict()
    poisoned = {name for name in reference_state if name.split(".")[-1] != "num_batches_tracked"
                and _file_key_of(name) in mapped.dropped}
    assert poisoned, "the original holds tensors of the drop list (noise head, schedule, post_quant_conv)"
    backup = {name: reference_state[name].clone() for name in poisoned}
    with torch.no_grad():
        for name in poisoned:
            reference_state[name].fill_(float("nan"))
    try:
        output, _ = case.torch_forward()
    finally:
        with torch.no_grad():
            for name, value in backup.items():
                reference_state[name].copy_(value)
    np.testing.assert_array_equal(output, case.expected[0])


def _file_key_of(torch_name: str) -> str:
    """The file key of a tensor of the PyTorch original whose name is not the same in both: the UNet's noise head
    (diffusers conv_norm_out / conv_out, ldm out.0 / out.2)."""
    for diffusers_name, ldm_name in (("diffusion_model.conv_norm_out.", "diffusion_model.out.0."),
                                     ("diffusion_model.conv_out.", "diffusion_model.out.2.")):
        torch_name = torch_name.replace(diffusers_name, ldm_name)
    return torch_name


def test_missing_unexpected_and_misshaped_keys_are_listed(case):
    state = dict(case.file_state)
    head_key = SWAPS[case.task][0]
    del state[head_key]
    state["decode_head.extra.weight"] = np.zeros((3,), np.float32)
    gamma = "encoder.gamma" if case.task == "depth" else "gamma"
    state[gamma] = np.zeros((TEXT_DIM + 1,), np.float32)
    with pytest.raises(WeightLoadingError) as err:
        _converted(case, state)
    message = str(err.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in message, message
    assert "decode_head.extra.weight" in message and gamma in message

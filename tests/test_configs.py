"""Every config file in configs/ with each of its arguments: builds, holds only fields of base_config, sets the
reference hyper-parameters (docs/reference.md: each VPD task's training data, optimiser and test protocol sections;
"AdamW and parameter groups"), and its model, loss, optimizer and sharded train state are consistent (eval_shape: no
compute). The paper configs read their architecture from `config.init` (arch 'init'); here they get the SD v1.5
preset, which has the same shapes, and 'random' class embeddings / the 'hash' tokenizer in place of files."""
from __future__ import annotations

import glob
import importlib.util
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import tensorflow as tf
from flax.traverse_util import flatten_dict

from vpd_jax import parallel
from vpd_jax.models import presets
from vpd_jax.models.compute import Compute
from vpd_jax.run.config import base_config
from vpd_jax.run.setup import resolve_architecture
from vpd_jax.run.trainer import build_trainer
from vpd_jax.tasks.registry import make_task

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")) if not p.endswith("common.py"))


def load_module(path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"configs.{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def all_configs() -> list[tuple[str, str]]:
    """(file, arg) for every config file and every argument in its ARGS (default: none and 'smoke')."""
    cases = []
    for path in CONFIG_FILES:
        args = getattr(load_module(path), "ARGS", ("", "smoke"))
        cases += [(os.path.basename(path), arg) for arg in args]
    return cases


def get_config(file: str, arg: str):
    return load_module(os.path.join(CONFIG_DIR, file)).get_config(arg)


def runs_on_cpu(file: str, arg: str) -> bool:
    """The smoke variants and the demo: the tiny architecture, no files needed."""
    return arg == "smoke" or file == "demo.py"


CASES = all_configs()
SD_SIZE = [c for c in CASES if not runs_on_cpu(*c)]
SMOKE = [c for c in CASES if runs_on_cpu(*c)]


VPD_TASKS = ("seg", "depth", "refer")


def runnable_without_files(config):
    """The config with what needs downloaded files replaced by stand-ins of the same shapes."""
    config = config.copy_and_resolve_references()
    if config.model.arch == "init":
        config.model.arch = "sd15"
    if config.task in ("seg", "depth") and not config.model.class_embeddings:
        config.model.class_embeddings = "random"
    if "tokenizer" in config.model and not config.model.tokenizer:
        config.model.tokenizer = "hash"
    return config


def element_spec(config) -> dict[str, tf.TensorSpec]:
    """The training pipeline's batch keys and shapes (vpd_jax/data/pipelines.py) from the data config alone."""
    aug, task = config.data.aug, config.data.task
    size = (aug.size, aug.size) if task in ("refer", "phrasecut") else tuple(aug.crop_size)
    spec = {"image": tf.TensorSpec((None, *size, 3), tf.float32)}
    if task == "seg":
        spec["label"] = tf.TensorSpec((None, *size), tf.int32)
    elif task == "depth":
        spec.update(depth=tf.TensorSpec((None, *size), tf.float32), scene_class=tf.TensorSpec((None,), tf.int32))
    elif task == "refer":
        spec.update(mask=tf.TensorSpec((None, *size), tf.int32), text=tf.TensorSpec((None,), tf.string))
    elif task == "phrasecut":
        spec.update(mask=tf.TensorSpec((None, *size, 1), tf.float32), text=tf.TensorSpec((None,), tf.string))
    else:
        raise AssertionError(f"data task {task!r}: add its training batch keys to tests/test_configs.py")
    return spec


def test_every_config_file_declares_its_arguments_and_rejects_others():
    assert {os.path.basename(p) for p in CONFIG_FILES} >= {"vpd_seg_ade20k.py", "vpd_depth_nyu.py", "vpd_refer.py"}
    for path in CONFIG_FILES:
        with pytest.raises(ValueError, match="unknown config argument 'nonsense'"):
            load_module(path).get_config("nonsense")


@pytest.mark.parametrize("file,arg", CASES)
def test_config_builds_with_only_base_fields(file, arg):
    config = get_config(file, arg)
    base = base_config(config.task, config.data.name)
    assert set(flatten_dict(config.to_dict())) == set(flatten_dict(base.to_dict())), (
        "a config file may only set fields that base_config (its task's sections) defines and documents")
    module = load_module(os.path.join(CONFIG_DIR, file))
    assert "python train.py --config=configs/" in module.__doc__, "the docstring gives the launch command"
    if runs_on_cpu(file, arg):
        assert config.model.arch == "tiny" and config.data.name.startswith("vpd_shapes")  # no files needed


# global batch, lr, wd, schedule, training length, token length: docs/reference.md, "Segmentation training data",
# "Segmentation optimiser", "Segmentation test protocol", "Depth training data", "Depth optimiser",
# "Depth test protocol", "Referring model", "Referring data", "Referring loss and optimiser".
REFERENCE = {
    ("vpd_seg_ade20k.py", ""): dict(
        batch_size=16, total_steps=80_000, lr=8e-5, weight_decay=1e-3, param_groups="vpd_seg",
        schedule=dict(name="poly", power=1.0, min_lr=0.0, warmup_steps=1500, warmup_ratio=1e-6),
        crop=(512, 512), eval=dict(seg_crop=(512, 512), seg_stride=(341, 341), seg_ratios=(1.0,), flip=False)),
    ("vpd_seg_ade20k.py", "aug"): dict(
        batch_size=16, total_steps=80_000, lr=8e-5, weight_decay=1e-3, param_groups="vpd_seg",
        schedule=dict(name="poly", power=1.0, min_lr=0.0, warmup_steps=1500, warmup_ratio=1e-6),
        crop=(512, 512), eval=dict(seg_crop=(512, 512), seg_stride=(341, 341),
                                   seg_ratios=(1.0, 1.125, 1.25, 1.375, 1.5), flip=True)),
    ("vpd_depth_nyu.py", ""): dict(
        batch_size=24, total_steps=25 * 1009, steps_per_epoch=1009, lr=5e-4, weight_decay=0.1,
        param_groups="vpd_depth", schedule=dict(name="vpd_depth_ramp", power=0.9, min_lr=3e-5, warmup_steps=0),
        crop=(480, 480), eval=dict(depth_window=480, depth_shift_size=2, flip=True, depth_crop="eigen")),
    **{("vpd_refer.py", arg): dict(
        batch_size=32, total_steps=40 * (refs // 32), lr=5e-5, weight_decay=1e-2, param_groups="vpd_refer",
        schedule=dict(name="poly", power=0.9, min_lr=0.0, warmup_steps=0), size=512, text_max_length=length)
       for arg, refs, length in (("", 42_404, 40), ("refcoco", 42_404, 40), ("refcoco+", 42_278, 40),
                                 ("refcocog", 42_226, 77))},
}


@pytest.mark.parametrize("file,arg", sorted(REFERENCE))
def test_paper_configs_reproduce_the_reference_hyperparameters(file, arg):
    config, want = get_config(file, arg), REFERENCE[(file, arg)]
    assert config.model.arch == "init" and config.model.timestep == 1 and config.model.latent_scale == 1.0
    assert config.model.use_attn == (config.task != "depth") and config.model.attn_max_queries == -1
    assert config.optim.b1 == 0.9 and config.optim.b2 == 0.999 and config.optim.eps == 1e-8
    assert config.optim.clip_grad_norm == 0 and config.optim.grad_accum_steps == 1 and config.optim.ema_decay == 0
    for key in ("batch_size", "total_steps", "steps_per_epoch"):
        if key in want:
            assert config[key] == want[key], key
    for key in ("lr", "weight_decay", "param_groups"):
        assert config.optim[key] == want[key], key
    for key, value in want["schedule"].items():
        assert config.optim.schedule[key] == value, key
    if "crop" in want:
        assert tuple(config.data.aug.crop_size) == want["crop"]
    if "size" in want:
        assert config.data.aug.size == want["size"] and config.data.text_max_length == want["text_max_length"]
    for key, value in want.get("eval", {}).items():
        assert (tuple(config.eval[key]) if isinstance(value, tuple) else config.eval[key]) == value, key


def check_model_and_state(file: str, arg: str, mesh) -> dict:
    """eval_shape of model, loss and train state; the state's shardings on `mesh`. Returns the abstract state."""
    config = runnable_without_files(get_config(file, arg))
    task = make_task(config, resolve_architecture(config))
    spec = element_spec(config)
    trainer = build_trainer(config, task, mesh)
    batch = {k: jax.ShapeDtypeStruct((2, *s.shape[1:]), s.dtype.as_numpy_dtype) for k, s in spec.items()
             if k != "text"}
    if "text" in spec:
        batch["tokens"] = jax.ShapeDtypeStruct((2, config.data.text_max_length), jnp.int32)
    # The task's example batch (what the state is initialised and the bench compiled from) is a training batch.
    example = task.example_batch(2)
    assert {k: (v.shape, v.dtype) for k, v in example.items()} == {k: (s.shape, s.dtype) for k, s in batch.items()}

    def loss(state, batch):
        variables = trainer.variables(state)
        output, _ = task.apply(variables, batch, task.constants, train=True, rng=jax.random.key(0))
        return task.loss(output, batch)

    with nn.logical_axis_rules(trainer.rules):
        value = jax.eval_shape(loss, trainer.abstract_state, batch)
    assert value.shape == () and value.dtype == jnp.float32
    if config.task not in VPD_TASKS:
        return trainer.abstract_state
    arch = resolve_architecture(config)
    unet = trainer.abstract_state["params"]["unet"]
    assert unet["conv_in"]["kernel"].shape[-1] == arch.unet.block_out_channels[0]
    assert "conv_out" not in unet and "conv_norm_out" not in unet  # never applied (docs/reference.md, "VPD backbone")
    # The VAE is frozen, except where the config trains it on purpose (the demo's scratch segmentation).
    trained_vae = config.model.train_vae
    assert ("vae" in trainer.abstract_state["frozen"]) != trained_vae
    assert ("vae" in trainer.abstract_state["params"]) == trained_vae
    assert trained_vae == (file == "demo.py" and arg == "seg")
    assert ("text_encoder" in trainer.abstract_state["frozen"]) == (config.task == "refer")
    return trainer.abstract_state


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])


@pytest.mark.parametrize("file,arg", SMOKE)
def test_smoke_model_shapes(file, arg, mesh):
    check_model_and_state(file, arg, mesh)


@pytest.mark.slow
@pytest.mark.parametrize("file,arg", SD_SIZE)
def test_sd15_size_model_shapes_and_shardings(file, arg, mesh):
    """The paper configs at SD v1.5 size: model + loss shapes, and a state that fsdp/tensor really shard."""
    state = check_model_and_state(file, arg, mesh)
    fsdp_tensor = jax.sharding.PartitionSpec("fsdp", "tensor")
    if get_config(file, arg).task in VPD_TASKS:
        kernel = state["params"]["unet"]["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_q"]
        assert kernel["kernel"].shape == (640, 640) and kernel["kernel"].sharding.spec == fsdp_tensor
    # The optimizer's per-parameter slots (Adam moments) shard like their parameters.
    params = jax.tree.structure(state["params"])
    slots = [node for node in jax.tree.leaves(state["opt_state"], is_leaf=lambda n: jax.tree.structure(n) == params)
             if jax.tree.structure(node) == params]
    assert len(slots) >= 2
    for slot in slots:
        assert jax.tree.leaves(jax.tree.map(lambda m, p: m.sharding == p.sharding, slot, state["params"])) == [
            True] * params.num_leaves
    per_device = sum(x.size * x.dtype.itemsize / x.sharding.num_devices * _replication(x) for x in jax.tree.leaves(state)
                     if hasattr(x, "sharding"))
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "size"))
    assert per_device < 0.45 * total, "fsdp x tensor = 4 should hold roughly a quarter of the state per device"


def _replication(x) -> int:
    """How many devices hold each element of a sharded abstract array."""
    spec = x.sharding.spec
    used = {a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)}
    mesh = x.sharding.mesh
    replicas = 1
    for axis in mesh.axis_names:
        if axis not in used:
            replicas *= mesh.shape[axis]
    return replicas


def test_sd15_preset_matches_config_init_shapes():
    """The stand-in is faithful: arch 'init' on an SD v1.5 folder gives presets.ARCHITECTURES['sd15'] (checked on
    the UNet and VAE configs parsed from SD v1.5's own config.json values)."""
    from vpd_jax.models.unet_config import UNetConfig

    sd15_unet_json = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json (network fields)
        act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
        cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
        mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    assert UNetConfig.from_dict(sd15_unet_json) == presets.architecture("sd15").unet


def test_compute_section_reaches_the_model_and_rejects_bad_values():
    config = base_config("seg", "vpd_shapes/small")
    config.model.update(arch="tiny", class_embeddings="random")
    config.compute.update(remat_policy="nothing_saveable", attention_query_chunk=256, dtype="bfloat16",
                          attention="splash", map_attention="pallas", attention_block_q=256, attention_block_kv=384,
                          pallas_interpret=True, matmul_precision="highest")
    task = make_task(config, presets.architecture("tiny"))
    assert task.model.compute == Compute(dtype=jnp.bfloat16, param_dtype=jnp.float32, remat_policy="nothing_saveable",
                                         attention_query_chunk=256, attention="splash", map_attention="pallas",
                                         attention_block_q=256, attention_block_kv=384, pallas_interpret=True,
                                         matmul_precision="highest")
    for field, value, error in (("attention_query_chunk", -1, r"config\.compute: attention_query_chunk=-1 must be"),
                                ("dtype", "float16", r"config\.compute\.dtype='float16'"),
                                ("remat_policy", "sometimes", r"config\.compute: unknown remat policy 'sometimes'"),
                                ("attention", "splash2", r"config\.compute: unknown attention kernel 'splash2'"),
                                ("map_attention", "splash", r"config\.compute: unknown map attention kernel 'splash'"),
                                ("attention_block_q", 100, r"config\.compute: attention_block_q=100 must be a "
                                                           "positive multiple of 128")):
        section = base_config("seg", "vpd_shapes/small").compute
        section[field] = value
        with pytest.raises(ValueError, match=error):
            Compute.from_config(section)

"""Feature probing (vpd_jax/{models,tasks,apps}/probe.py, configs/probe_sd_features.py): the smoke run through
`python -m vpd_jax.apps.probe` writes a table with a finite metric per (tap, t) and a heatmap of that grid; each probe channel is its own
(tap, t) decoder on the frozen features; the frozen parts get no gradient; SD checkpoints load strictly.

The smoke run is a subprocess started in the background by the first (slow) test and checked by the last, so
that the in-process tests compile meanwhile on the second core."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from PIL import Image

from tests.models.ldznet_reference import host_init
from vpd_jax import parallel, visualize
from vpd_jax.apps import probe as probe_report
from vpd_jax.models import probe as probe_model
from vpd_jax.models.presets import architecture
from vpd_jax.models.unet import UNet2DConditionModel
from vpd_jax.run.setup import resolve_architecture
from vpd_jax.run.trainer import build_trainer
from vpd_jax.tasks.probe import METRICS
from vpd_jax.tasks.registry import make_task

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "probe_sd_features.py")
SMOKE_TAPS = ["down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.3.attentions.1"]
SMOKE_TIMESTEPS = [100, 500]
# The in-process tests probe the encoder and the middle only: the forward stops at the mid block (half the compile).
TAPS = ("down_blocks.1.attentions.0", "mid_block.attentions.0", "down_blocks.2.attentions.0")
SIZE, TOKENS = 32, 16


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("probe_sd_features_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke run as its docstring launches it, shortened to 4 steps and one eval batch; started in the
    background so that the in-process tests below compile meanwhile (2 cores)."""
    root = tmp_path_factory.mktemp("probe")
    workdir = root / "run"
    args = [sys.executable, "-m", "vpd_jax.apps.probe", f"--config={CONFIG}:smoke", f"--workdir={workdir}",
            f"--config.data.data_dir={root / 'tfds'}", "--config.total_steps=4", "--config.ckpt_every=4",
            "--config.eval_max_batches=1"]
    log = open(root / "log.txt", "w")
    proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def finish():
        try:
            proc.wait(timeout=1200)
        finally:
            if proc.poll() is None:
                proc.kill()
        log.close()
        assert proc.returncode == 0, (root / "log.txt").read_text()[-4000:]
        return workdir

    yield finish
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_the_smoke_run_starts(smoke_run):
    """(Only starts the background run: the tests below check its results after the in-process tests.)"""
    assert callable(smoke_run)


# --------------------------------------------------------------------------------------- in-process checks


@pytest.fixture(scope="module")
def tiny_probe():
    config = get_config("smoke")
    config.data.aug.size = SIZE
    config.model.taps = TAPS
    task = make_task(config, architecture("tiny"))
    batch = {"image": jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32),
             "tokens": jax.ShapeDtypeStruct((2, TOKENS), jnp.int32)}

    shapes = nn.meta.unbox(jax.eval_shape(task.init_variables, jax.random.key(0), batch, {}))
    params = host_init(shapes["params"], seed=1)
    rng = np.random.default_rng(0)
    data = {"image": rng.uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32),
            "tokens": rng.integers(0, 1000, (2, TOKENS)).astype(np.int32),
            "mask": (rng.uniform(size=(2, SIZE, SIZE, 1)) > 0.6).astype(np.float32),
            "image_id": np.array([3, 4]), "valid": np.array([True, False])}
    return task, params, data


def test_parameters_are_the_whole_sd_unet_but_its_head_and_one_decoder_per_probe(tiny_probe):
    task, params, _ = tiny_probe
    assert sorted(params) == sorted(["vae", "text_encoder", "unet"] + [
        probe_model.decoder_name(tap, t) for tap in TAPS for t in SMOKE_TIMESTEPS])
    sd = UNet2DConditionModel(architecture("tiny").unet)
    full = nn.meta.unbox(jax.eval_shape(sd.init, jax.random.key(0), *sd.dummy_inputs())["params"])
    expected = {k: v for k, v in flatten_dict(jax.tree.map(lambda x: x.shape, full)).items()
                if k[0] not in ("conv_norm_out", "conv_out")}
    assert flatten_dict(jax.tree.map(lambda x: x.shape, params["unet"])) == expected
    # The optimizer of the config trains the decoders only.
    from vpd_jax.run import optim

    _, info = optim.make_optimizer(task.config.optim, params, 10)
    trainable, frozen = info.split(params)
    assert sorted(frozen) == ["text_encoder", "unet", "vae"] and not {"unet", "vae", "text_encoder"} & set(trainable)


def test_each_channel_is_its_own_tap_and_timestep(tiny_probe):
    """The probe of (tap, t) in the full model equals a model with only that tap and timestep (same per-example
    noise), so channel order and the timestep batching cannot be mixed up."""
    task, params, data = tiny_probe
    model = task.model
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(2))
    full = jax.jit(lambda p: model.apply({"params": p}, data["image"], data["tokens"], keys))(params)
    assert full.shape == (2, SIZE, SIZE, len(TAPS) * len(SMOKE_TIMESTEPS))
    for index, (tap, t) in [(4, (TAPS[2], 100))]:  # tap-major; timestep-major order would put it at 2
        single = model.clone(taps=(tap,), timesteps=(t,))
        name = probe_model.decoder_name(tap, t)
        subset = {k: params[k] for k in ("vae", "text_encoder", "unet", name)}
        out = jax.jit(lambda p: single.apply({"params": p}, data["image"], data["tokens"], keys))(subset)
        np.testing.assert_allclose(np.asarray(full[..., index]), np.asarray(out[..., 0]), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(full[..., 0] - full[..., 1])).max() > 1e-4  # the timesteps give different features


def test_frozen_parts_get_no_gradient(tiny_probe):
    task, params, data = tiny_probe

    @jax.jit
    def grads(p):
        def loss(p):
            output, _ = task.apply({"params": p}, data, {}, train=True, rng=jax.random.key(0))
            return task.loss(output, data), output
        return jax.grad(loss, has_aux=True)(p)

    g, _ = grads(params)
    for frozen in ("unet", "vae", "text_encoder"):
        assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g[frozen])), frozen
    for tap in TAPS:
        for t in SMOKE_TIMESTEPS:
            assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g[probe_model.decoder_name(tap, t)])) > 0


def test_eval_statistics_give_every_metric_of_every_probe(tiny_probe):
    task, params, data = tiny_probe
    counts, valid = jax.jit(lambda p: task.eval_statistics({"params": p}, data, {}))(params)
    assert counts.shape == (6, 2, 49, 4) and valid.tolist() == [True, False]
    metric = task.new_metric()
    metric.update(jax.device_get((counts, valid)))
    result = metric.result()
    assert result["probe_taps"] == list(TAPS) and result["probe_timesteps"] == SMOKE_TIMESTEPS
    for tap in TAPS:
        for t in SMOKE_TIMESTEPS:
            for name in METRICS:
                assert f"{tap}/t={t}/{name}" in result


def test_config_checks():
    arch = architecture("tiny")
    config = get_config("smoke")
    config.model.taps = ("up_blocks.9.attentions.0",)
    with pytest.raises(ValueError, match="not modules of this UNet.*\n.*conv_in"):
        make_task(config, arch)
    config.model.taps = ("conv_out",)
    with pytest.raises(ValueError, match="output head"):
        make_task(config, arch)
    config = get_config("smoke")
    config.model.timesteps = (100, 1000)
    with pytest.raises(ValueError, match="outside"):
        make_task(config, arch)
    config = get_config("smoke")
    config.eval.metric = "accuracy"
    with pytest.raises(ValueError, match="config.eval.metric"):
        make_task(config, arch)
    # The paper's set: all 16 spatial transformers of SD v1 (LDM input_blocks 1, 2, 4, 5, 7, 8, the middle block,
    # output_blocks 3-11), encoder to decoder.
    paper_taps = ([f"down_blocks.{i}.attentions.{j}" for i in range(3) for j in range(2)] + ["mid_block.attentions.0"]
                  + [f"up_blocks.{i}.attentions.{j}" for i in (1, 2, 3) for j in range(3)])
    assert get_config().model.taps == () and probe_model.default_taps(architecture("sd15").unet) == tuple(paper_taps)
    with pytest.raises(ValueError, match="unknown config argument 'x'"):
        get_config("x")


def test_an_sd_checkpoint_loads_into_the_frozen_parts(tmp_path):
    """config.init = a (tiny) diffusers pipeline: the trainer's strict pretrained path fills the frozen UNet, VAE and
    CLIP with the checkpoint's values, and the text tower's config comes from the checkpoint."""
    from tests.apps.test_zeroshot import save_tiny_sd_pipeline
    from vpd_jax.run.init_rng import init_key
    from vpd_jax.run.start import pretrained_state
    from vpd_jax.weights import load_text_encoder, load_unet, load_vae

    root = save_tiny_sd_pipeline(str(tmp_path / "sd"))
    config = get_config("smoke")
    config.init, config.model.arch, config.model.tokenizer = root, "init", ""
    config.model.taps = ("mid_block.attentions.0",)
    config.model.timesteps = (300,)
    config.data.aug.size = 16
    task = make_task(config, resolve_architecture(config))
    assert task.arch.text.hidden_size == 32 and task.tokenizer([""], 8).shape == (1, 8)
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    trainer = build_trainer(config, task, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        loaded = pretrained_state(trainer, init_key(config.seed, config.init_rng), root)
    for name, loader in (("unet", load_unet), ("vae", load_vae), ("text_encoder", load_text_encoder)):
        reference = flatten_dict(loader(root)[1])
        ours = flatten_dict(loaded["frozen"][name])
        assert ours.keys() == {k for k in reference if k[0] not in ("conv_norm_out", "conv_out")}, name
        for key, value in ours.items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(reference[key]))


# ---------------------------------------------------------------------------------------------- the report


def test_report_table_and_heatmap_from_a_result(tmp_path):
    result = {"probe_taps": ["a.b", "c"], "probe_timesteps": [10, 20, 30], "eval_batches": 1}
    values = np.array([[0.1, 0.5, 0.2], [0.9, 0.3, 0.4]])
    for i, tap in enumerate(result["probe_taps"]):
        for j, t in enumerate(result["probe_timesteps"]):
            for k, name in enumerate(METRICS):
                result[f"{tap}/t={t}/{name}"] = float(values[i, j]) + k
    paths = probe_report.write_report(result, "IoU_FG@0.3", str(tmp_path))
    report = json.load(open(paths["json"]))
    np.testing.assert_allclose(report["table"], values + 1)
    assert report["all"]["c"]["20"]["AP"] == pytest.approx(0.3 + 3)
    lines = open(paths["markdown"]).read().splitlines()
    assert "| c | **1.9000** | 1.3000 | 1.4000 |" in lines and "| IoU_FG@0.3 | t=10 | t=20 | t=30 |" in lines
    check_heatmap(paths["heatmap"], values + 1, result["probe_taps"], result["probe_timesteps"])


def check_heatmap(path, values, taps, timesteps):
    """The PNG is the labelled grid: rows = taps, columns = timesteps, each cell the colour of its value."""
    picture = np.asarray(Image.open(path).convert("RGB"))
    expected, (top, left) = probe_report.heatmap_image(values, taps, timesteps)
    np.testing.assert_array_equal(picture, expected)
    cell = probe_report.HEATMAP_CELL
    colours = visualize.colormap(values, np.nanmin(values), np.nanmax(values))
    for i in range(len(taps)):
        for j in range(len(timesteps)):
            # the bottom-right corner of a cell is free of its text
            np.testing.assert_array_equal(picture[top + (i + 1) * cell - 3, left + (j + 1) * cell - 3], colours[i, j])


# ------------------------------------------------------------------------------------- the smoke run's results


@pytest.mark.slow
def test_smoke_run_writes_a_finite_table_and_a_heatmap_of_taps_by_timesteps(smoke_run):
    workdir = smoke_run()
    report = json.load(open(workdir / "probe_table.json"))
    assert report["metric"] == "mIoU@0.3"
    assert report["taps"] == SMOKE_TAPS and report["timesteps"] == SMOKE_TIMESTEPS
    table = np.asarray(report["table"])
    assert table.shape == (3, 2) and np.isfinite(table).all() and ((0 <= table) & (table <= 1)).all()
    with open(workdir / "eval_4.json") as f:
        evaluation = json.load(f)
    for i, tap in enumerate(SMOKE_TAPS):
        for j, t in enumerate(SMOKE_TIMESTEPS):
            assert evaluation[f"{tap}/t={t}/mIoU@0.3"] == pytest.approx(table[i, j])
    markdown = (workdir / "probe_table.md").read_text().splitlines()
    assert sum(line.startswith(f"| {tap} |") for line in markdown for tap in SMOKE_TAPS) == 3
    check_heatmap(workdir / "probe_heatmap.png", table, SMOKE_TAPS, SMOKE_TIMESTEPS)

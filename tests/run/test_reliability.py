"""A training run under bad conditions (issue 19): an update that explodes without a NaN, resuming a workdir with
another config, and inputs the run cannot use, each refused or handled before anything is built or written.

In-process and fast: the loop runs the linear regression task of tests/run/test_train.py; the resume and start-up
checks run on workdirs whose checkpoints are written here (a tiny state, the smoke config, a data iterator),
with the input pipeline (and, where the check comes first, the whole setup) replaced by a function that fails.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import tasks
from tests.run.test_train import assert_trees_equal, regression_batch, regression_trainer
from vpd_jax.data import pipelines
from vpd_jax.run import checkpoint, logs, start, training
from vpd_jax.run.setup import setup

class _Batches:
    """A checkpointable iterator over host batches (what the loop and the Checkpointer need of the input)."""

    def __init__(self, batches: list[dict]):
        self.batches, self.position = batches, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def save(self, prefix: str) -> None:
        Path(f"{prefix}.json").write_text(json.dumps(self.position))

    def restore(self, prefix: str) -> None:
        self.position = json.loads(Path(f"{prefix}.json").read_text())


def regression_batches(count: int, poisoned: tuple[int, ...] = ()) -> _Batches:
    """Host batches of the regression task; the (1-based) batches in `poisoned` have a NaN pixel."""
    rng = np.random.default_rng(0)
    batches = []
    for i in range(1, count + 1):
        image = rng.standard_normal((8, 4, 4, 3)).astype(np.float32)
        if i in poisoned:
            image[0, 0, 0, 0] = np.nan
        batches.append({"image": image, "target": rng.standard_normal((8, 3)).astype(np.float32)})
    return _Batches(batches)


def must_not_be_called(*args, **kwargs):
    raise AssertionError("the run got past the point where it should have been refused")


def checkpoint_steps(root: Path) -> list[int]:
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def file_bytes(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ================================================================ 1. an update that explodes without a NaN


@pytest.mark.parametrize("nonfinite_check", ["gradients", "updates"])
def test_an_update_that_overflows_the_parameter_norm_is_not_applied(nonfinite_check):
    """lr = 1e30: the loss, the gradient norm and the learning rate of step 1 are finite, the parameters it would
    give are finite too (about 1e30), but their norm overflows: the step is counted as non-finite and not applied."""
    trainer, state = regression_trainer(lr=1e30, nonfinite_check=nonfinite_check)
    before = jax.device_get(state)
    batch = jax.device_put(next(regression_batches(1)), trainer.batch_sharding)
    state, metrics = trainer.jit_train_step()(state, batch, {})
    metrics = jax.device_get(metrics)
    assert all(np.isfinite(metrics[k]) for k in ("loss", "grad_norm", "lr")), metrics
    after = jax.device_get(state)
    assert (int(after["nonfinite"]), int(after["first_nonfinite_step"]), int(after["nonfinite_streak"])) == (1, 1, 1)
    assert_trees_equal(after["params"], before["params"], "params after an exploding update")
    assert_trees_equal(after["opt_state"], before["opt_state"], "opt_state after an exploding update")
    assert np.isfinite(metrics["param_norm"])


def run_loop(tmp_path: Path, *, lr: float, policy: str, total_steps: int, max_consecutive: int = 10,
             poisoned: tuple[int, ...] = ()) -> tuple[dict, dict, Path]:
    """_train of the regression task with a log and a checkpoint at every step; (initial state, final state,
    checkpoint root). A NonFiniteError propagates."""
    trainer, state = regression_trainer(lr=lr)
    config = trainer.config
    config.total_steps, config.log_every, config.ckpt_every = total_steps, 1, 1
    config.nonfinite, config.nonfinite_max_consecutive = policy, max_consecutive
    initial = jax.device_get(state)
    root = tmp_path / "checkpoints"
    ckpt = checkpoint.Checkpointer(root, max_to_keep=None, save_interval_steps=1, async_save=False)
    writer = logs.MetricWriter(str(tmp_path))
    started = start.StartState(state, 0, "scratch")
    try:
        guard = training.NonFiniteGuard.for_run(config, started, ckpt)
        final = training._train(config, trainer, started, regression_batches(total_steps, poisoned), ckpt, writer,
                                evaluate=must_not_be_called, guard=guard)
        return initial, jax.device_get(final), root
    finally:
        ckpt.close()
        writer.close()


def test_stop_an_exploding_run_before_its_state_reaches_a_checkpoint(tmp_path):
    """The issue's lr = 1e30 run: step 1 used to be applied (parameters around 1e24, param_norm Infinity) and
    checkpointed, so every rerun resumed the blown-up state. Now it stops at step 1 saying that nothing was
    checkpointed; a rerun starts again from scratch."""
    with pytest.raises(training.NonFiniteError) as err:
        run_loop(tmp_path, lr=1e30, policy="stop", total_steps=3)
    message = str(err.value)
    assert "at train step 1 (1 such step(s) so far)" in message
    assert "norm of the parameters it would give" in message and "not applied" in message
    assert "This run has written no checkpoint" in message and "config.optim.lr" in message
    assert checkpoint_steps(tmp_path / "checkpoints") == []
    assert not (tmp_path / "metrics.jsonl").read_text()


def test_skip_warns_with_the_count_and_stops_after_too_many_in_a_row(tmp_path, caplog):
    """'skip' with an lr that explodes every step: each skipped step is a warning with the running count; the
    checkpoints written before the limit hold the untouched parameters; at the limit the run stops, naming the
    steps and the last intact checkpoint (it used to end with rc 0 and evaluate blown-up parameters)."""
    caplog.set_level("WARNING")
    with pytest.raises(training.NonFiniteError) as err:
        run_loop(tmp_path, lr=1e30, policy="skip", total_steps=6, max_consecutive=3)
    message = str(err.value)
    assert "train steps 1 to 3: 3 consecutive non-finite steps" in message
    assert "config.nonfinite_max_consecutive=3" in message
    assert f"the last checkpoint, {tmp_path / 'checkpoints' / '2'}, is intact" in message
    warnings = [r.getMessage() for r in caplog.records if "non-finite step(s) skipped" in r.getMessage()]
    assert [w.split(": ")[0] for w in warnings] == ["train steps 1-1", "train steps 2-2", "train steps 3-3"]
    assert ["1 in this run so far" in warnings[0], "2 in this run so far" in warnings[1]] == [True, True]
    assert checkpoint_steps(tmp_path / "checkpoints") == [1, 2]


def test_skip_recovers_from_a_few_bad_batches(tmp_path, caplog):
    """Two NaN batches in a row (below the limit): skipped, counted, warned about; the run finishes with
    finite, trained parameters and a closing warning."""
    caplog.set_level("WARNING")
    initial, final, root = run_loop(tmp_path, lr=1e-2, policy="skip", total_steps=5, max_consecutive=3,
                                    poisoned=(2, 3))
    assert (int(final["nonfinite"]), int(final["first_nonfinite_step"]), int(final["nonfinite_streak"])) == (2, 2, 0)
    assert (int(final["longest_nonfinite_streak"]), int(final["longest_nonfinite_streak_end"])) == (2, 3)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(final["params"]))
    assert not np.array_equal(final["params"]["head"]["kernel"], initial["params"]["head"]["kernel"])
    assert any("2 of the 5 train steps of this run were non-finite" in r.getMessage() for r in caplog.records)
    assert checkpoint_steps(root) == [1, 2, 3, 4, 5]


# ======================================================================== 2. resuming with another config


def smoke_config(tmp_path: Path, **overrides):
    """The seg smoke config with dotted-key overrides, its (never built) dataset under tmp_path."""
    return tasks.smoke_config("seg", **{"data.data_dir": str(tmp_path / "tfds"), **overrides})


def workdir_with_checkpoint(tmp_path: Path, config, state=None, step: int = 2) -> Path:
    """A workdir as a run of `config` leaves it: checkpoint `step` (state, data iterator, config) and its record."""
    workdir = tmp_path / "run"
    with checkpoint.Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
        ckpt.save(step, state if state is not None else {"w": np.zeros(2, np.float32)},
                  data_iterator=regression_batches(1), config=config, force=True)
    logs.write_run_metadata(str(workdir), config)
    return workdir


@pytest.mark.parametrize("override,field", [
    ({"batch_size": 2}, "batch_size: checkpoint 4, this run 2"),
    ({"data.seed": 7}, "data.seed: checkpoint 0, this run 7"),
    ({"data.aug.crop_size": (32, 32)}, "data.aug.crop_size: checkpoint [64, 64], this run [32, 32]"),
])
def test_resume_with_another_data_stream_is_refused_before_anything_is_written(tmp_path, monkeypatch, override,
                                                                              field):
    """The issue's batch size change: it used to fail with a raw TF shape error from the restored iterator after
    config.json had been rewritten. Now the run is refused by name before setup, and the workdir is untouched."""
    workdir = workdir_with_checkpoint(tmp_path, smoke_config(tmp_path))
    before = file_bytes(workdir)
    monkeypatch.setattr(training, "setup", must_not_be_called)
    with pytest.raises(ValueError) as err:
        training.train_and_evaluate(smoke_config(tmp_path, **override), str(workdir))
    message = str(err.value)
    assert field in message and "continues a data stream that this config changes" in message
    assert "use a new --workdir" in message and f"--config.resume={workdir / 'checkpoints' / '2'}" in message
    assert file_bytes(workdir) == before


def test_resume_allows_schedule_mesh_and_data_location_changes_and_says_so(tmp_path, caplog):
    workdir = workdir_with_checkpoint(tmp_path, smoke_config(tmp_path))
    found = start.workdir_checkpoint(str(workdir / "checkpoints"))
    assert (found.step, found.processes) == (2, ["process_0"])
    changed = smoke_config(tmp_path, **{"total_steps": 6, "optim.lr": 1e-5, "mesh.fsdp": 2, "mesh.data": -1,
                                        "data.data_dir": str(tmp_path / "moved")})
    start.check_resume(found, changed, process_count=1)
    caplog.set_level("INFO")
    start.log_resume_differences(found, changed)
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    infos = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "INFO")
    assert "total_steps: checkpoint 4, this run 6" in warnings
    assert "optim.lr: checkpoint 8e-05, this run 1e-05" in warnings
    assert "data.data_dir" in warnings and "mesh.fsdp" not in warnings
    assert "resharded on restore" in infos and "mesh.fsdp: checkpoint 1, this run 2" in infos

    caplog.clear()
    start.log_resume_differences(found, smoke_config(tmp_path, total_steps=2))
    assert "nothing to train" in caplog.text


def test_resume_on_another_number_of_processes_is_refused(tmp_path):
    workdir = workdir_with_checkpoint(tmp_path, smoke_config(tmp_path))
    found = start.workdir_checkpoint(str(workdir / "checkpoints"))
    with pytest.raises(ValueError, match=r"input iterators of 1 process\(es\) \(process_0\) and this run has 2"):
        start.check_resume(found, smoke_config(tmp_path), process_count=2)


def test_finding_the_workdir_checkpoint_writes_nothing(tmp_path):
    """Not even the clean-up of a half-written step (the writing Checkpointer does that, after the checks)."""
    workdir = workdir_with_checkpoint(tmp_path, smoke_config(tmp_path))
    (workdir / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir()
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    assert start.workdir_checkpoint(str(workdir / "checkpoints")).step == 2
    assert start.workdir_checkpoint(str(tmp_path / "absent")) is None
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before


def test_a_changed_record_is_kept_not_overwritten(tmp_path):
    first, second = smoke_config(tmp_path), smoke_config(tmp_path, total_steps=6)
    logs.write_run_metadata(str(tmp_path), first)
    original = (tmp_path / "config.json").read_text()
    logs.write_run_metadata(str(tmp_path), first)  # the same config: nothing to keep
    assert not (tmp_path / "config.1.json").exists()
    logs.write_run_metadata(str(tmp_path), second)
    assert (tmp_path / "config.1.json").read_text() == original
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 6
    logs.write_run_metadata(str(tmp_path), first)
    assert json.loads((tmp_path / "config.2.json").read_text())["total_steps"] == 6
    assert not list(tmp_path.glob("*.tmp"))


def test_a_checkpoint_of_another_model_is_refused_before_the_pipeline(tmp_path, monkeypatch):
    """Keys and shapes come from the checkpoint's metadata, compared with the model's abstract state."""
    config = smoke_config(tmp_path)
    abstract = setup(config).trainer.abstract_state
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)  # host arrays save fastest
    workdir = workdir_with_checkpoint(tmp_path, config, state)
    before = file_bytes(workdir)
    monkeypatch.setattr(pipelines, "make_train_iterator", must_not_be_called)
    with pytest.raises(checkpoint.CheckpointMismatchError) as err:
        training.train_and_evaluate(smoke_config(tmp_path, **{"model.fpn_channels": 16}), str(workdir))
    assert "mis-shaped  params.head." in str(err.value)
    assert "model.fpn_channels: checkpoint 32, this run 16" in str(err.value)
    assert file_bytes(workdir) == before


# ======================================================================= cheap checks before anything is built


@pytest.mark.parametrize("overrides,error", [
    ({"batch_size": 0}, r"config\.batch_size=0 must be positive"),
    ({"eval_batch_size": -8}, r"config\.eval_batch_size=-8 must be positive"),
    ({"nonfinite_max_consecutive": 0}, r"config\.nonfinite_max_consecutive=0 must be positive"),
    ({"eval_every": -1}, r"config\.eval_every=-1 must be 0 or more"),
])
def test_bad_values_fail_before_setup(tmp_path, monkeypatch, overrides, error):
    monkeypatch.setattr(training, "setup", must_not_be_called)
    with pytest.raises(ValueError, match=error):
        training.train_and_evaluate(smoke_config(tmp_path, **overrides), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_an_unusable_workdir_fails_before_setup(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "setup", must_not_be_called)
    config = smoke_config(tmp_path)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match=re.escape(f"--workdir {a_file} is a file")):
        training.train_and_evaluate(config, str(a_file))
    with pytest.raises(NotADirectoryError, match=re.escape(f"cannot be created: {a_file} is a file")):
        training.train_and_evaluate(config, str(a_file / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    with pytest.raises(ValueError, match=r"run/checkpoints is a file; the run writes a directory there"):
        training.train_and_evaluate(config, str(tmp_path / "run"))
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(read_only) and real_access(path, mode))
    with pytest.raises(PermissionError, match=re.escape(f"cannot be created: {read_only} is not writable")):
        training.train_and_evaluate(config, str(read_only / "run"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "read_only", "run"]
    assert not list(read_only.iterdir())


def test_batches_that_do_not_split_over_the_mesh_fail_before_the_pipeline(tmp_path, monkeypatch):
    """The test session has 8 CPU devices; the smoke config's batch of 4 on a data=-1 mesh cannot split over 8."""
    monkeypatch.setattr(pipelines, "make_train_iterator", must_not_be_called)
    with pytest.raises(ValueError, match=r"config\.batch_size=4 does not split over the 8 devices"):
        training.train_and_evaluate(smoke_config(tmp_path), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# Diffusers configs: the tiny preset's UNet with another cross-attention width (its text encoder's), and its VAE.
MISFIT_UNET = dict(sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=1, attention_head_dim=2,
                   cross_attention_dim=16, norm_num_groups=8,
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TINY_VAE = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8)


def test_init_weights_that_do_not_fit_a_preset_fail_before_the_pipeline(tmp_path, monkeypatch):
    """config.model.arch='tiny' with config.init files of another shape: refused, naming the file and the arch,
    before the input pipeline and the state are built (it used to surface only after both)."""
    from tests.reference_models import save_pipeline, save_tiny_unet, save_tiny_vae

    root = str(tmp_path / "sd")
    save_pipeline(root, unet=save_tiny_unet(os.path.join(root, "unet"), MISFIT_UNET),
                  vae=save_tiny_vae(os.path.join(root, "vae"), **TINY_VAE))
    monkeypatch.setattr(pipelines, "make_train_iterator", must_not_be_called)
    config = smoke_config(tmp_path, init=root)
    first_misfit = "unet/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel"  # cross-attention
    expected = re.escape(f"config.init={root!r} does not fit the model (config.model.arch='tiny')")
    with pytest.raises(ValueError, match=expected + r".*mis-shaped \['" + first_misfit):
        training.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ============================================================================ checkpoint files that break


def test_a_corrupt_checkpoint_names_the_step_and_the_file(tmp_path):
    mesh_sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",)),
                                               jax.sharding.PartitionSpec())
    state = {"w": jax.device_put(jnp.arange(1000.0), mesh_sharding)}
    root = tmp_path / "checkpoints"
    with checkpoint.Checkpointer(root, async_save=False) as ckpt:
        ckpt.save(1, state, config={"a": 1})
    data_files = [p for p in (root / "1" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(data_files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    (root / "1" / "config" / "metadata").write_text("{not json")
    with checkpoint.Checkpointer(root, read_only=True) as ckpt:
        with pytest.raises(checkpoint.CheckpointReadError,
                           match=re.escape(f"checkpoint {root / '1'} cannot be read: ") + ".*(byte range|size)"):
            ckpt.restore(1, checkpoint.abstract_like(state))
        with pytest.raises(checkpoint.CheckpointReadError,
                           match=re.escape(f"checkpoint {root / '1'} cannot be read: JSON")):
            ckpt.restore_config(1)
    (root / "1" / "state" / "_METADATA").unlink()
    with checkpoint.Checkpointer(root, read_only=True) as ckpt:
        with pytest.raises(checkpoint.CheckpointReadError, match=r"_METADATA missing or empty"):
            ckpt.restore(1, checkpoint.abstract_like(state))


def test_a_checkpoint_from_before_the_streak_counters_restores_with_them_zero(tmp_path):
    """A state saved without the entries checkpoint.ADDED_STATE_ENTRIES names (checkpoints of earlier versions)
    restores into today's state with those entries zero and everything else as saved; another missing entry is
    still a mismatch."""
    trainer, state = regression_trainer(lr=1e-2)
    state, _ = trainer.jit_train_step()(state, regression_batch(trainer), {})
    old = {k: v for k, v in state.items() if k not in checkpoint.ADDED_STATE_ENTRIES}
    with checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        ckpt.save(1, old)
    with checkpoint.Checkpointer(tmp_path / "ckpt", read_only=True) as ckpt:
        assert ckpt.check_fits(1, trainer.abstract_state) == list(checkpoint.ADDED_STATE_ENTRIES)
        restored = ckpt.restore(1, trainer.abstract_state)
        assert_trees_equal(jax.device_get({k: restored[k] for k in old}), jax.device_get(old), "restored state")
        for name in checkpoint.ADDED_STATE_ENTRIES:
            assert int(restored[name]) == 0 and restored[name].sharding == trainer.abstract_state[name].sharding
        target = {**trainer.abstract_state, "opt_state_extra": trainer.abstract_state["step"]}
        with pytest.raises(checkpoint.CheckpointMismatchError, match="missing     opt_state_extra"):
            ckpt.restore(1, target)

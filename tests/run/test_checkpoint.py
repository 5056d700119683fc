"""Checkpoints: sharded state + config + per-process tf.data iterator in one Orbax step, resume order, clear errors,
and kill-and-resume (SIGKILL at a random moment and during an asynchronous save) equal to an uninterrupted run."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.helpers.kill_seed import describe, kill_seed
from vpd_jax import parallel
from vpd_jax.data.iterator import DataIterator
from vpd_jax.run.checkpoint import CheckpointMismatchError, Checkpointer, abstract_like
from vpd_jax.run.start import restore_or_initialize

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])


def make_state(mesh, spec=P("fsdp", "tensor"), scale=1.0):
    shardings = {"params": {"w": NamedSharding(mesh, spec), "b": NamedSharding(mesh, P())},
                 "step": NamedSharding(mesh, P())}
    values = {"params": {"w": scale * jnp.arange(32.0).reshape(4, 8), "b": jnp.full((3,), scale)},
              "step": jnp.asarray(7, jnp.int32)}
    return jax.device_put(values, shardings)


def dataset():
    return tf.data.Dataset.range(40).shuffle(8, seed=0).map(lambda n: {"x": n * 3}).batch(2)


def test_round_trip_into_other_shardings_with_config_and_iterator(tmp_path, mesh):
    data = DataIterator(dataset())
    next(data)
    state = make_state(mesh, spec=P("data"))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.save(3, state, data_iterator=data, config={"optim": {"lr": 1e-3}, "name": "x"})
        expected = [next(data)["x"] for _ in range(3)]  # saved before these were drawn
        ckpt.wait_until_finished()
        assert {"config", "data", "state"} <= set(os.listdir(tmp_path / "ckpt" / "3"))
        assert os.listdir(tmp_path / "ckpt" / "3" / "data" / "process_0")

        target = abstract_like(make_state(mesh, spec=P(("fsdp", "tensor"))))
        restored_data = DataIterator(dataset())
        restored = ckpt.restore(3, target, data_iterator=restored_data)
        assert restored["params"]["w"].sharding == target["params"]["w"].sharding
        assert restored["params"]["w"].sharding != state["params"]["w"].sharding
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state)
        for want in expected:
            np.testing.assert_array_equal(next(restored_data)["x"], want)
        assert ckpt.restore_config(3) == {"optim": {"lr": 1e-3}, "name": "x"}


def test_raw_tf_data_iterator(tmp_path, mesh):
    iterator = iter(dataset())
    next(iterator)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, make_state(mesh), data_iterator=iterator)
        expected = next(iterator)["x"].numpy()
        fresh = iter(dataset())
        ckpt.restore(1, abstract_like(make_state(mesh)), data_iterator=fresh)
        np.testing.assert_array_equal(next(fresh)["x"].numpy(), expected)


def test_relative_directory_is_taken_from_the_working_directory(tmp_path, mesh, monkeypatch):
    """`--workdir=runs/x` (Orbax itself only writes to absolute paths)."""
    monkeypatch.chdir(tmp_path)
    state = make_state(mesh)
    with Checkpointer("runs/x/checkpoints") as ckpt:
        assert ckpt.save(1, state)
        ckpt.wait_until_finished()
        assert ckpt.directory == tmp_path / "runs" / "x" / "checkpoints"
        restored = ckpt.restore(1, abstract_like(state))
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.asarray(state["params"]["w"]))
    assert (tmp_path / "runs" / "x" / "checkpoints" / "1").is_dir()


def test_keep_and_interval(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=5) as ckpt:
        saved = [step for step in range(1, 21) if ckpt.save(step, state)]
        ckpt.wait_until_finished()
        assert saved == [5, 10, 15, 20]  # the interval only, not a fresh run's first step
        assert ckpt.all_steps() == [15, 20]
        assert ckpt.save(21, state, force=True)
        ckpt.wait_until_finished()
        assert ckpt.latest_step() == 21


def test_mismatched_checkpoint_names_the_keys(tmp_path, mesh):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, make_state(mesh))
        target = abstract_like(make_state(mesh))
        target["params"]["w"] = jax.ShapeDtypeStruct((4, 16), jnp.float32, sharding=target["params"]["w"].sharding)
        target["params"]["extra"] = target["params"].pop("b")
        with pytest.raises(CheckpointMismatchError) as err:
            ckpt.restore(1, target)
        message = str(err.value)
        assert "missing     params.extra" in message
        assert "unexpected  params.b: checkpoint has (3,)" in message
        assert "mis-shaped  params.w: checkpoint has (4, 8), model has (4, 16)" in message
        with pytest.raises(ValueError, match="without a sharding"):
            ckpt.restore(1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_state(mesh)))


def test_iterator_errors(tmp_path, mesh):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, make_state(mesh))
        with pytest.raises(FileNotFoundError, match="no data-iterator state"):
            ckpt.restore(1, abstract_like(make_state(mesh)), data_iterator=DataIterator(dataset()))
        ckpt.save(2, make_state(mesh), data_iterator=DataIterator(dataset()))
        os.rename(tmp_path / "2" / "data" / "process_0", tmp_path / "2" / "data" / "process_1")
        with pytest.raises(FileNotFoundError, match=r"process 0 of 1 \(the checkpoint has \['process_1'\]\)"):
            ckpt.restore(2, abstract_like(make_state(mesh)), data_iterator=DataIterator(dataset()))


def test_half_written_step_is_ignored_and_removed(tmp_path, mesh):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(2, make_state(mesh))
    leftover = tmp_path / "4.orbax-checkpoint-tmp-1700000000000000"
    (leftover / "state").mkdir(parents=True)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2
        ckpt.save(3, make_state(mesh))  # Orbax removes leftovers in the background, finished before a save
        assert not leftover.exists()


# ----------------------------------------------------------------------------------------------- resume order

class Calls:
    def __init__(self, mesh):
        self.mesh, self.log = mesh, []

    def init_fn(self):
        self.log.append("init_fn")
        return make_state(self.mesh, scale=0.0)

    def load_init(self, path):
        self.log.append(("load_init", path))
        return make_state(self.mesh, scale=1.0)


def test_resume_order(tmp_path, mesh):
    abstract = abstract_like(make_state(mesh))
    weights = tmp_path / "sd.safetensors"
    weights.write_bytes(b"")
    other = tmp_path / "other_run"
    with Checkpointer(other, async_save=False) as ckpt:
        ckpt.save(5, make_state(mesh, scale=5.0))
        ckpt.save(6, make_state(mesh, scale=6.0))

    calls = Calls(mesh)
    with Checkpointer(tmp_path / "scratch") as ckpt:
        start = restore_or_initialize(ckpt, abstract_state=abstract, init_fn=calls.init_fn)
    assert (start.source, start.step, calls.log) == ("scratch", 0, ["init_fn"])

    calls = Calls(mesh)
    with Checkpointer(tmp_path / "init") as ckpt:
        start = restore_or_initialize(ckpt, abstract_state=abstract, init_fn=calls.init_fn, init=str(weights),
                                      load_init=calls.load_init)
    assert (start.source, start.step) == ("init", 0)
    assert calls.log == [("load_init", str(weights))]  # the loader builds the state: no scratch state first
    assert float(start.state["params"]["b"][0]) == 1.0

    calls = Calls(mesh)
    with Checkpointer(tmp_path / "resumed") as ckpt:
        start = restore_or_initialize(ckpt, abstract_state=abstract, init_fn=calls.init_fn, resume=str(other),
                                      init=str(weights), load_init=calls.load_init)
        assert (start.source, start.step, calls.log) == ("resume", 6, [])
        assert float(start.state["params"]["b"][0]) == 6.0
        ckpt.save(7, start.state, force=True)
        ckpt.wait_until_finished()
    start = restore_or_initialize(Checkpointer(other, read_only=True), abstract_state=abstract,
                                  init_fn=calls.init_fn)
    assert (start.source, start.step) == ("workdir", 6)

    with Checkpointer(tmp_path / "resumed") as ckpt:  # this workdir wins over resume and init
        start = restore_or_initialize(ckpt, abstract_state=abstract, init_fn=calls.init_fn, resume=str(other),
                                      init=str(weights), load_init=calls.load_init)
    assert (start.source, start.step, calls.log) == ("workdir", 7, [])

    with Checkpointer(tmp_path / "one_step") as ckpt:  # resume from a step directory
        start = restore_or_initialize(ckpt, abstract_state=abstract, init_fn=calls.init_fn, resume=str(other / "5"))
    assert (start.source, start.step, float(start.state["params"]["b"][0])) == ("resume", 5, 5.0)


def test_resume_and_init_errors(tmp_path, mesh):
    abstract = abstract_like(make_state(mesh))
    calls = Calls(mesh)
    with Checkpointer(tmp_path / "run") as ckpt:
        with pytest.raises(FileNotFoundError, match="config.resume='/nonexistent/run' does not exist"):
            restore_or_initialize(ckpt, abstract_state=abstract, init_fn=calls.init_fn, resume="/nonexistent/run")
        (tmp_path / "empty").mkdir()
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            restore_or_initialize(ckpt, abstract_state=abstract, init_fn=calls.init_fn, resume=str(tmp_path / "empty"))
        with pytest.raises(FileNotFoundError, match="config.init='/nonexistent/sd' : pretrained weights not found"
                           .replace(" :", ":")):
            restore_or_initialize(ckpt, abstract_state=abstract, init_fn=calls.init_fn, init="/nonexistent/sd",
                                  load_init=calls.load_init)
    assert calls.log == []
    other = tmp_path / "incompatible"
    with Checkpointer(other, async_save=False) as ckpt:
        ckpt.save(1, {"params": {"w": jnp.zeros((2, 2))}})
    with Checkpointer(tmp_path / "run") as ckpt:
        with pytest.raises(CheckpointMismatchError, match=r"(?s)incompatible/1 does not fit.*missing     params\.b"):
            restore_or_initialize(ckpt, abstract_state=abstract, init_fn=calls.init_fn, resume=str(other))


# ------------------------------------------------------------------------------------------ kill and resume

STEPS = 16


def _worker(workdir: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.run.checkpoint_worker", str(workdir), str(log), str(STEPS), *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=open(str(log) + ".stderr", "a"), text=True)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "DONE" in out, f"worker failed:\n{out}\n{Path(str(log) + '.stderr').read_text()}"


def _records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: step -> its log record."""
    root = tmp_path_factory.mktemp("reference")
    proc = _worker(root / "ckpt", root / "log")
    _finish(proc, root / "log")
    records = _records(root / "log")
    assert records[0]["start"] == 0
    return {r["step"]: r for r in records[1:]}


def _check_resumed_run(reference: dict, log: Path, killed_at_or_before: int) -> int:
    """The restarted run started at the last complete checkpoint with the reference's state, drew the reference's
    batches and ended with the reference's state, to the bit. Returns the step it resumed from."""
    records = _records(log)
    starts = [i for i, r in enumerate(records) if "start" in r]
    assert len(starts) == 2, starts
    resumed, after = records[starts[1]], records[starts[1] + 1:]
    assert resumed["start"] <= killed_at_or_before
    if resumed["start"] > 0:
        assert resumed["source"] == "workdir"
        assert resumed["w"] == reference[resumed["start"]]["w"]
    assert [r["step"] for r in after] == list(range(resumed["start"] + 1, STEPS + 1))
    for record in after:
        assert record == reference[record["step"]], f"step {record['step']} differs from the uninterrupted run"
    return resumed["start"]


def test_sigkill_during_async_save_resumes_exactly(tmp_path, reference):
    seed = kill_seed()
    killed_step = random.Random(seed).choice(range(4, STEPS, 2))
    print(f"{describe(seed)}: killing during the save of step {killed_step}")  # shown on failure
    workdir, log = tmp_path / "ckpt", tmp_path / "log"
    proc = _worker(workdir, log, "--slow_finalize_step", str(killed_step))
    for line in proc.stdout:
        if line.split() == ["SAVING", str(killed_step)]:
            proc.kill()  # SIGKILL while the save of killed_step is being finalised
            break
    proc.wait(timeout=60)
    assert proc.returncode == -9, f"the worker was not killed (killed_step {killed_step})"
    assert killed_step not in [int(p.name) for p in workdir.iterdir() if p.name.isdigit()]
    assert [p for p in workdir.iterdir() if p.name.startswith(f"{killed_step}.orbax-checkpoint-tmp")], \
        "expected the half-written step directory"

    proc = _worker(workdir, log)
    _finish(proc, log)
    assert _check_resumed_run(reference, log, killed_step) == killed_step - 2
    assert not [p for p in workdir.iterdir() if "tmp" in p.name]


def test_sigkill_at_a_random_moment_resumes_exactly(tmp_path, reference):
    seed = kill_seed()
    delay = random.Random(seed).uniform(0.0, 0.1 * STEPS)
    workdir, log = tmp_path / "ckpt", tmp_path / "log"
    proc = _worker(workdir, log, "--step_sleep", "0.1")
    for line in proc.stdout:
        if line.startswith("READY"):
            break
    time.sleep(delay)
    proc.kill()
    proc.wait(timeout=60)
    done = [r["step"] for r in _records(log) if "step" in r]
    killed_after = max(done, default=0)

    print(f"{describe(seed)}: killed {delay:.2f} s after start, after step {killed_after}")  # shown on failure

    proc = _worker(workdir, log)
    _finish(proc, log)
    _check_resumed_run(reference, log, killed_after)

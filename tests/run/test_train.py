"""train.py / eval.py end to end, and the trainer's guarantees (issue 5, "What must hold").

In-process (8 fake CPU devices): optimizer groups on the real model trees; the non-finite guard of the step; a
train step sharded over (data 2, fsdp 2, tensor 2) equal to the unsharded one; `config.init` loading straight into
the sharded state; failures at start.

Subprocesses (train.py, eval.py, tests/run/train_worker.py): few-step runs of each task's smoke config and one
with intervals longer than the run, eval.py reproducing the in-training evaluation, SIGKILL-and-resume, the
non-finite policies in a real run, two processes against one, an incompatible workdir.

Cost. Nearly all the time is XLA compilation (and tracing) of the tiny SD-shaped models. The subprocesses share a
persistent compilation cache (a fresh directory per test session), so a program is compiled once per session
however many runs use it, and they run two at a time in the background (`SmokeRuns`) while the in-process tests
use the main thread: each test only waits for the runs it reads. A shared cache is also what production restarts
see after the first compile; the bitwise comparisons below are between runs of the same compiled programs.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import PartitionSpec as P

from tests.helpers import tasks as tasks_helpers
from tests.helpers.kill_seed import describe, kill_seed
from tests.reference_models import save_pipeline, save_tiny_unet, save_tiny_vae, unet_diffusers_to_ldm
from tests.run.test_optim import REFERENCE as REFERENCE_RULES, UNET_PREFIX
from vpd_jax import parallel
from vpd_jax.data import pipelines
from vpd_jax.models import presets
from vpd_jax.models.heads.common import BatchNorm
from vpd_jax.models.unet_config import OUTPUT_HEAD_PARAMS
from vpd_jax.parallel import device_batch
from vpd_jax.run import checkpoint, logs, start, training
from vpd_jax.run.config import base_config
from vpd_jax.run.param_groups import assign_groups, resolve_rules
from vpd_jax.run.setup import host_data_config, resolve_architecture
from vpd_jax.run.trainer import build_trainer
from vpd_jax.tasks.base import Task
from vpd_jax.tasks.registry import make_task
from vpd_jax.weights import load_unet, load_vae
from vpd_jax.weights.convert import torch_key_of

REPO = Path(__file__).resolve().parents[2]
CONFIGS = tasks_helpers.SMOKE_CONFIGS  # task -> config file
SMOKE_STEPS = 4  # the smoke configs' total_steps; checkpoints every 2
RUN_TIMEOUT = 1500  # seconds per subprocess; a cold compile under full load takes about 4 minutes


# ============================================================================================ shared helpers


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """vpd_shapes/small, built once per session (the runs would otherwise race to build it)."""
    root = str(tmp_path_factory.mktemp("tfds"))
    pipelines.prepare(smoke_config("seg", root).data)
    return root


def smoke_config(task: str, data_dir: str, **overrides):
    """The task's smoke config reading the session's dataset, with dotted-key overrides."""
    return tasks_helpers.smoke_config(task, **{"data.data_dir": data_dir, **overrides})


def read_state(workdir: Path, step: int) -> dict:
    """A checkpoint's train state as numpy arrays, whatever mesh or processes wrote it."""
    path = Path(workdir) / "checkpoints" / str(step) / "state"
    reader = ocp.PyTreeCheckpointer()
    tree = reader.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def checkpoint_steps(workdir: Path) -> list[int]:
    root = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def assert_trees_equal(a, b, what: str = "") -> None:
    """Same structure and bit-identical leaves; the message names the first differing leaf."""
    flat_a, flat_b = _flat_any(a), _flat_any(b)
    assert flat_a.keys() == flat_b.keys(), f"{what}: different leaves {sorted(flat_a.keys() ^ flat_b.keys())[:5]}"
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=f"{what}: {key}")


def _flat_any(tree) -> dict:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def leaf_differences(a, b) -> dict[str, tuple[float, float]]:
    """Per leaf: (max|a - b|, max|b|)."""
    flat_a, flat_b = _flat_any(a), _flat_any(b)
    assert flat_a.keys() == flat_b.keys()
    out = {}
    for key, y in flat_b.items():
        x, y = np.asarray(flat_a[key], np.float64), np.asarray(y, np.float64)
        out[key] = (float(np.abs(x - y).max()), float(np.abs(y).max())) if y.size else (0.0, 0.0)
    return out


def max_relative_difference(a, b) -> tuple[float, str]:
    """max over leaves of max|a - b| / max|b| (0 for an all-zero pair), and the worst leaf."""
    relative = {key: diff / scale if scale > 0 else diff for key, (diff, scale) in leaf_differences(a, b).items()}
    worst = max(relative, key=relative.get, default="")
    return (relative[worst], worst) if worst and relative[worst] > 0 else (0.0, "")


def update_differences(new_a, new_b, old, opt_state) -> dict[str, float]:
    """Per leaf: max |update_a - update_b| over the elements whose gradient float32 resolves.

    Adam's first steps move a parameter by about lr x sign(gradient) whatever the gradient's size, so an element
    whose gradient is float32 noise (|g| <= 1e-4 x the leaf's largest |g|: it sums terms that cancel) may move
    either way in two equally correct computations. Those elements are compared through the moments, not here.
    The gradient is read from Adam's first moment (after one update: (1 - b1) g)."""
    mu = optax.tree_utils.tree_get(opt_state, "mu")
    flat = {k: _flat_any(t) for k, t in (("a", new_a), ("b", new_b), ("old", old), ("mu", mu))}
    out = {}
    for key, g in flat["mu"].items():
        g = np.abs(np.asarray(g, np.float64))
        resolved = g > 1e-4 * g.max() if g.size else g.astype(bool)
        old_leaf = np.asarray(flat["old"][key], np.float64)
        ua = np.asarray(flat["a"][key], np.float64) - old_leaf
        ub = np.asarray(flat["b"][key], np.float64) - old_leaf
        out[key] = float(np.abs(ua - ub)[resolved].max()) if resolved.any() else 0.0
    return out


def assert_as_close_as_a_reordering(what: str, ours: dict[str, tuple[float, float]], reordered: dict[str, float]):
    """ours: per leaf (distance of the sharded step's value from the unsharded step's, tolerance); reordered: per
    leaf, the distance of the same unsharded step on the batch in reverse order (the same sums in another order,
    as a sharded step computes them). Each leaf must be within max(tolerance, 3 x the reordered distance): a few
    leaves of a real step (gradients that are small sums of large terms, e.g. a bias ahead of a batch norm that
    removes it) move that much under any reordering; everything else must agree to the tolerance."""
    ratio = {key: diff / max(tolerance, 3 * reordered[key], 1e-30) for key, (diff, tolerance) in ours.items()}
    worst = max(ratio, key=ratio.get)
    assert ratio[worst] <= 1, (f"{what}: sharded vs unsharded differ by {ours[worst][0]:.3e} at {worst} "
                               f"(tolerance {ours[worst][1]:.3e}, batch in reverse order {reordered[worst]:.3e})")


def metrics_lines(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


# ============================================================================ subprocess runs in the background


def subprocess_env(devices: int, cache_dir: Path) -> dict:
    env = dict(os.environ)  # the conftest's fast-compile XLA flags and quiet TF
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", PYTHONPATH=str(REPO))
    return env


@dataclasses.dataclass
class Run:
    """A finished subprocess: its command, exit code, output files and wall time."""

    name: str
    args: list[str]
    returncode: int
    stdout: Path
    stderr: Path
    seconds: float

    @property
    def err(self) -> str:
        return self.stderr.read_text(errors="replace")

    @property
    def out(self) -> str:
        return self.stdout.read_text(errors="replace")

    def check(self) -> "Run":
        assert self.returncode == 0, f"{self.name} failed (exit {self.returncode}):\n{self.err[-6000:]}"
        return self


class SmokeRuns:
    """Named subprocess jobs, each run at most once per session, two at a time in a background pool.

    A job may wait for a job submitted before it (its compile cache is then warm): with FIFO start order, the
    awaited job has already started, so the pool cannot deadlock.
    """

    def __init__(self, root: Path, data_dir: str, workers: int = 2):
        self.root, self.data_dir = root, data_dir
        self.cache = root / "compilation_cache"
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="smoke-run")
        self.futures: dict[str, concurrent.futures.Future] = {}
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.closed = False

    # ----- plumbing

    def submit(self, name: str) -> concurrent.futures.Future:
        with self.lock:
            if name not in self.futures:
                job, deps = JOBS[name]
                for dep in deps:
                    self.futures.setdefault(dep, None)
                for dep in deps:  # dependencies go first (FIFO)
                    if self.futures[dep] is None:
                        self.futures[dep] = self.pool.submit(JOBS[dep][0], self)
                self.futures[name] = self.pool.submit(job, self)
            return self.futures[name]

    def result(self, name: str):
        return self.submit(name).result()

    def start(self, name: str, args: list[str], *, devices: int = 1, worker: bool = False) -> tuple:
        """Starts `python train.py|eval.py|-m tests.run.train_worker args`; returns (Popen, stdout, stderr, t0)."""
        if self.closed:
            raise RuntimeError("the test module has finished")
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        stdout, stderr = logs / f"{name}.out", logs / f"{name}.err"
        command = [sys.executable, "-m", "tests.run.train_worker"] if worker else [sys.executable]
        proc = subprocess.Popen(command + args, cwd=REPO, env=subprocess_env(devices, self.cache),
                                stdout=open(stdout, "w"), stderr=open(stderr, "w"))
        with self.lock:
            self.procs.add(proc)
        return proc, stdout, stderr, time.perf_counter()

    def wait(self, name: str, started: tuple, args: list[str]) -> Run:
        proc, stdout, stderr, t0 = started
        try:
            proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with self.lock:
            self.procs.discard(proc)
        return Run(name, args, proc.returncode, stdout, stderr, time.perf_counter() - t0)

    def run(self, name: str, args: list[str], **kwargs) -> Run:
        return self.wait(name, self.start(name, args, **kwargs), args)

    def close(self) -> None:
        self.closed = True
        for future in self.futures.values():
            if future is not None:
                future.cancel()
        with self.lock:
            for proc in list(self.procs):  # only the processes this module started
                proc.kill()
        self.pool.shutdown(wait=True)

    # ----- commands

    def train_args(self, task: str, workdir: Path, *overrides: str) -> list[str]:
        return [f"--config={REPO / 'configs' / CONFIGS[task]}:smoke", f"--workdir={workdir}",
                f"--config.data.data_dir={self.data_dir}", *overrides]

    def train(self, name: str, task: str, *overrides: str, worker_flags: tuple = ()) -> tuple[Path, Run]:
        workdir = self.root / name
        args = self.train_args(task, workdir, *overrides)
        script = list(worker_flags) if worker_flags else [str(REPO / "train.py")]
        return workdir, self.run(name, script + args, worker=bool(worker_flags))


# Overrides of the reference seg run, shared by the runs that are compared with it bitwise (same command).
SEG_REFERENCE = ("--config.log_every=1",)


@dataclasses.dataclass
class TaskRun:
    workdir: Path
    train: Run
    train_eval: dict  # eval_<last>.json as training wrote it
    eval: Run
    eval_json: dict  # as eval.py rewrote it


def job_task(task: str, overrides: tuple = ()) -> Callable[[SmokeRuns], TaskRun]:
    def job(runs: SmokeRuns) -> TaskRun:
        workdir, train = runs.train(task, task, *overrides)
        train.check()
        path = workdir / f"eval_{SMOKE_STEPS}.json"
        train_eval = json.loads(path.read_text())
        shutil.copy(path, workdir / f"eval_{SMOKE_STEPS}.train.json")
        args = [str(REPO / "eval.py"), f"--config={REPO / 'configs' / CONFIGS[task]}:smoke", f"--workdir={workdir}",
                f"--config.data.data_dir={runs.data_dir}"]
        evaluation = runs.run(f"{task}_eval", args)
        eval_json = json.loads(path.read_text()) if evaluation.returncode == 0 else {}
        return TaskRun(workdir, train, train_eval, evaluation, eval_json)
    return job


# Log and checkpoint intervals longer than the run (smoke: 4 steps); the train and eval programs are the reference
# seg run's, which this run follows (it compiles nothing new).
LONG_INTERVALS = ("--config.log_every=5", "--config.ckpt_every=5")


def job_long_intervals(runs: SmokeRuns) -> tuple[Path, Run]:
    return runs.train("seg_long_intervals", "seg", *LONG_INTERVALS)


@dataclasses.dataclass
class KillRun:
    workdir: Path
    description: str  # seed and where the kill happened: printed with any failure
    killed: Run
    steps_after_kill: list[int]
    leftovers_after_kill: list[str]
    restart: Run


def job_kill_at_random_step(runs: SmokeRuns) -> KillRun:
    """SIGKILL at a random moment of a random step (any phase: step, log, asynchronous save, evaluation); the
    step and delay come from VPD_KILL_SEED when it is set (tests/helpers/kill_seed.py)."""
    seed = kill_seed()
    rng = random.Random(seed)
    step, delay = rng.randint(1, SMOKE_STEPS), rng.uniform(0.0, 2.5)
    workdir = runs.root / "kill_random"
    args = [str(REPO / "train.py"), *runs.train_args("seg", workdir, *SEG_REFERENCE)]
    started = runs.start("kill_random", args)
    proc, _, stderr = started[:3]
    while proc.poll() is None and f"step {step}/{SMOKE_STEPS}" not in stderr.read_text(errors="replace"):
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    killed = runs.wait("kill_random", started, args)
    logged = [int(line.split("step ")[1].split("/")[0]) for line in killed.err.splitlines()
              if f"/{SMOKE_STEPS}  " in line and "step " in line]
    description = (f"{describe(seed)}: SIGKILL {delay:.2f} s after the log of step {step} (exit {killed.returncode}, "
                   f"last step logged {max(logged, default=0)})")
    steps, leftovers = checkpoint_steps(workdir), sorted(p.name for p in (workdir / "checkpoints").glob("*tmp*"))
    restart = runs.run("kill_random_restart", args)
    return KillRun(workdir, description + f", complete checkpoints {steps}", killed, steps, leftovers, restart)


def job_kill_during_async_save(runs: SmokeRuns) -> KillRun:
    """SIGKILL while a random step's asynchronous checkpoint is being finalised (tests/run/train_worker.py holds it);
    the step comes from VPD_KILL_SEED when it is set."""
    seed = kill_seed()
    step = random.Random(seed).choice(range(2, SMOKE_STEPS + 1, 2))
    workdir = runs.root / "kill_in_save"
    args = runs.train_args("seg", workdir, *SEG_REFERENCE)
    started = runs.start("kill_in_save", [f"--hold_save_of_step={step}", *args], worker=True)
    proc, stdout = started[:2]
    while proc.poll() is None and f"HOLDING {step}" not in stdout.read_text(errors="replace"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    killed = runs.wait("kill_in_save", started, args)
    steps, leftovers = checkpoint_steps(workdir), sorted(p.name for p in (workdir / "checkpoints").glob("*tmp*"))
    restart = runs.run("kill_in_save_restart", [str(REPO / "train.py"), *args])
    return KillRun(workdir, f"{describe(seed)}: SIGKILL during the asynchronous save of step {step}", killed, steps,
                   leftovers, restart)


def job_nonfinite(policy: str) -> Callable[[SmokeRuns], tuple[Path, Run]]:
    """A NaN image in the 3rd batch; logs and checks every 2 steps. 'skip' also checkpoints every step."""
    extra = ("--config.nonfinite=skip", "--config.ckpt_every=1", "--config.keep_ckpts=5") if policy == "skip" else ()
    return lambda runs: runs.train(f"nan_{policy}", "seg", *extra, worker_flags=("--nan_at_batch=3",))


MULTIPROCESS_MESH = ("--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_multiprocess(runs: SmokeRuns) -> dict[str, Any]:
    """The seg smoke run on 2 processes x 2 CPU devices (train.py, jax.distributed on 127.0.0.1) and on 1 process x
    4 devices fed the same global batches (tests/run/train_worker.py --emulate_processes=2)."""
    port = _free_port()
    two = runs.root / "two_processes"
    started = [runs.start(f"process_{i}", [str(REPO / "train.py"), *runs.train_args("seg", two, *MULTIPROCESS_MESH),
                                           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                           f"--process_id={i}"], devices=2) for i in range(2)]
    one = runs.root / "one_process"
    args = ["--emulate_processes=2", *runs.train_args("seg", one, *MULTIPROCESS_MESH)]
    single = runs.run("one_process", args, devices=4, worker=True)
    processes = [runs.wait(f"process_{i}", s, []) for i, s in enumerate(started)]
    return {"two": two, "processes": processes, "one": one, "single": single}


JOBS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "seg": (job_task("seg", SEG_REFERENCE), ()),
    "depth": (job_task("depth"), ()),
    "refer": (job_task("refer"), ()),
    "multiprocess": (job_multiprocess, ()),
    "kill_random": (job_kill_at_random_step, ("seg",)),
    "kill_in_save": (job_kill_during_async_save, ("seg",)),
    "nan_stop": (job_nonfinite("stop"), ("seg",)),
    "nan_skip": (job_nonfinite("skip"), ("seg",)),
    "seg_long_intervals": (job_long_intervals, ("seg",)),
}


def uses_runs(*names: str):
    """Declares the background runs a test reads (queued at module start when the test is selected)."""
    def mark(test):
        test.runs = names
        return test
    return mark


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, data_dir):
    """The background runs; at module start, every job a selected test of this module uses is queued (in JOBS
    order), so they run while the in-process tests do."""
    smoke = SmokeRuns(tmp_path_factory.mktemp("runs"), data_dir)
    wanted = {name for item in request.session.items if item.module is request.module
              for name in getattr(item.function, "runs", ())}
    for name in JOBS:
        if name in wanted:
            smoke.submit(name)
    yield smoke
    smoke.close()


@pytest.fixture(scope="module", autouse=True)
def _start_background_runs(runs):
    """Starts the queued runs with the module's first test."""


# ====================================================================== in-process: groups, guard, failures


def reference_names(paths, task: str, unet_layers: int) -> dict[tuple, str]:
    """Our parameter path -> the reference implementation's name (docs/reference.md, "Segmentation optimiser",
    "Depth optimiser", "Referring loss and optimiser")."""
    unet = {torch_key_of(p[1:]): p for p in paths if p[0] == "unet"}
    names = {unet[key]: UNET_PREFIX[f"vpd_{task}"] + name
             for name, key in unet_diffusers_to_ldm({k: k for k in unet}, unet_layers, prefix="").items()}
    for path in paths:
        if path[0] == "vae":
            names[path] = "encoder_vq." + torch_key_of(path[1:])
        elif path[0] == "text_encoder":
            names[path] = "text_encoder." + torch_key_of(path[1:])
        elif path[0] != "unet":
            # Text adapter, gamma, heads: the references name their norms bn* or by nn.Sequential index, never
            # "norm" (mmseg ConvModule 'bn', GLPDepth, LAVT SimpleDecoding bn1_*), and so do we.
            names[path] = ".".join(path[:-1]) + "." + ("bias" if path[-1] == "bias" else "weight")
    return names


@pytest.mark.parametrize("task", sorted(CONFIGS))
def test_optimizer_groups_on_the_real_model_tree(task, data_dir):
    """The tiny VPD model of each task, as vpd_jax/tasks/vpd.py builds it: every parameter's lr multiplier / decay / frozen
    state equals the reference rule applied to its reference name, the groups docs/reference.md names ("AdamW and
    parameter groups") are all populated, and the optimizer really applies them (one AdamW update of the trainer's
    transform)."""
    config = smoke_config(task, data_dir)
    arch = presets.architecture("tiny")
    model_task = make_task(config, arch)
    trainer = build_trainer(config, model_task, parallel.make_mesh({"data": 1}, jax.devices()[:1]))
    params = trainer.info.merge(trainer.abstract_state["params"], trainer.abstract_state["frozen"])
    groups = assign_groups(params, resolve_rules(config.optim.param_groups))
    rule = REFERENCE_RULES[f"vpd_{task}"]
    table, wrong = {}, []
    names = reference_names(list(flatten_dict(params)), task, arch.unet.layers_per_block[0])
    for path, leaf in flatten_dict(params).items():
        name = names[path]
        group = groups["/".join(path)]
        ours = "frozen" if group.frozen else (group.lr_mult, group.wd_mult)
        expected = rule(name, len(leaf.shape))
        table.setdefault(ours, []).append("/".join(path))
        if ours != expected:
            wrong.append(f"{'/'.join(path)} ({name}): ours {ours}, reference {expected}")
    assert not wrong, "\n".join(wrong)
    print("\n".join(f"{k}: {len(v)} params, e.g. {v[0]}" for k, v in table.items()))  # the listing, on failure

    n_transformers = 10  # tiny: 3 cross-attention down blocks x 1 layer, mid 1, 3 cross-attention up blocks x 2
    frozen = {p for p in table.get("frozen", [])}
    assert frozen == {"/".join(p) for p in flatten_dict(params) if p[0] in model_task.frozen_subtrees}
    assert set(flatten_dict(trainer.abstract_state["frozen"])) == {tuple(p.split("/")) for p in frozen}
    # docs/reference.md, "Segmentation optimiser", "Depth optimiser", "Referring loss and optimiser", in that order:
    if task == "seg":  # transformer norms x1 without decay, the rest of the UNet x0.1, the rest x1
        assert len(table[(1.0, 0.0)]) == n_transformers * 4 * 2
        assert all(p.startswith("unet/") for p in table[(0.1, 1.0)])
        assert {p.split("/")[0] for p in table[(1.0, 1.0)]} == {"text_adapter", "head"}
    elif task == "depth":  # UNet x0.01, no decay on 1-D params and biases anywhere
        assert {k for k in table if k != "frozen"} == {(0.01, 1.0), (0.01, 0.0), (1.0, 1.0), (1.0, 0.0)}
    else:  # everything at x1; UNet norms without decay; CLIP frozen too
        assert {k for k in table if k != "frozen"} == {(1.0, 1.0), (1.0, 0.0)}
        assert any(p.startswith("text_encoder/") for p in frozen)

    # One update from zero moments with gradient 1: Adam's direction is 1, so update = -lr lr_mult (1 + wd wd_mult p).
    # At p = 1 / wd the decay term is wd_mult itself, as large as Adam's: a decay that is lost, or applied with
    # another multiplier, moves the update by a factor, far outside the tolerance.
    assert config.optim.weight_decay > 0
    p = 1.0 / config.optim.weight_decay
    trainable = jax.tree.map(lambda s: jnp.full(s.shape, p, s.dtype), trainer.abstract_state["params"])
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = jax.jit(lambda g, p: trainer.tx.update(g, trainer.tx.init(p), p))(grads, trainable)
    lr = float(trainer.info.lr_at_step(0))
    assert {group.wd_mult for group in groups.values() if not group.frozen} >= {0.0, 1.0}  # both kinds are checked
    for path, update in flatten_dict(updates).items():
        group = groups["/".join(path)]
        want = -lr * group.lr_mult * (1.0 + group.wd_mult)
        np.testing.assert_allclose(np.asarray(update), want, rtol=1e-5, err_msg="/".join(path))


class _Regression(nn.Module):
    @nn.compact
    def __call__(self, images, *, train: bool):
        return nn.Dense(3, name="head")(images.mean((1, 2)))


class RegressionTask(Task):
    """A linear model on the mean colour: a task whose train step compiles in a second."""

    name = "regression"

    def __init__(self, config, arch):
        super().__init__(config, arch)
        self.model, self.constants = _Regression(), {}

    def image_size(self):
        return (4, 4)

    def example_targets(self, batch_size):
        return {"target": np.zeros((batch_size, 3), np.float32)}

    def model_args(self, batch, constants):
        return (batch["image"],)

    def loss(self, output, batch):
        return jnp.mean((output - batch["target"]) ** 2)

    def eval_statistics(self, variables, batch, constants):
        raise NotImplementedError

    def new_metric(self):
        raise NotImplementedError


def regression_trainer(lr: float, nonfinite_check: str = "gradients", eps: float = 1e-8):
    config = base_config("seg", "vpd_shapes/small")
    config.nonfinite_check = nonfinite_check
    config.optim.param_groups = "all"
    config.optim.lr = lr
    config.optim.eps = eps
    config.optim.schedule.name = "constant"
    config.total_steps = 10
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    trainer = build_trainer(config, RegressionTask(config, presets.architecture("tiny")), mesh)
    state = jax.jit(trainer.create_state, out_shardings=trainer.state_shardings)(jax.random.key(0))
    return trainer, state


def regression_batch(trainer, poison: bool = False, black: bool = False) -> dict:
    """poison: one NaN pixel; black: all-zero images, so the kernel's gradient is exactly zero."""
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((8, 4, 4, 3)).astype(np.float32),
             "target": rng.standard_normal((8, 3)).astype(np.float32)}
    if poison:
        batch["image"][3, 1, 2, 0] = np.nan
    if black:
        batch["image"][:] = 0.0
    return device_batch(batch, trainer.batch_sharding)


@pytest.mark.parametrize("nonfinite_check", ["gradients", "updates"])
def test_nonfinite_loss_gradient_or_update_never_reaches_the_state(nonfinite_check):
    trainer, state = regression_trainer(lr=1e-2, nonfinite_check=nonfinite_check)
    step = trainer.jit_train_step()
    before = jax.device_get(state)
    state, metrics = step(state, regression_batch(trainer), {})
    assert int(state["nonfinite"]) == 0 and np.isfinite(float(metrics["loss"]))
    assert not np.array_equal(jax.device_get(state)["params"]["head"]["kernel"], before["params"]["head"]["kernel"])

    good = jax.device_get(state)
    state, metrics = step(state, regression_batch(trainer, poison=True), {})  # train step 2: NaN loss
    assert np.isnan(float(metrics["loss"]))
    after = jax.device_get(state)
    assert_trees_equal(after["params"], good["params"], "params after a NaN step")
    assert_trees_equal(after["opt_state"], good["opt_state"], "opt_state after a NaN step")
    assert (int(after["step"]), int(after["nonfinite"]), int(after["first_nonfinite_step"])) == (2, 1, 2)
    with pytest.raises(training.NonFiniteError, match="at train step 2 "):
        training.NonFiniteGuard("stop", 1).check(state, 2)
    training.NonFiniteGuard("skip", 2).check(state, 2)

    state, _ = step(state, regression_batch(trainer), {})  # finite again: applied; the first bad step is kept
    assert (int(state["nonfinite"]), int(state["first_nonfinite_step"])) == (1, 2)
    assert not np.array_equal(jax.device_get(state)["params"]["head"]["kernel"], good["params"]["head"]["kernel"])

    # lr = nan: loss and gradient are finite but the update is not.
    trainer, state = regression_trainer(lr=float("nan"), nonfinite_check=nonfinite_check)
    before = jax.device_get(state)
    state, metrics = trainer.jit_train_step()(state, regression_batch(trainer), {})
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert (int(state["nonfinite"]), int(state["first_nonfinite_step"])) == (1, 1)
    assert_trees_equal(jax.device_get(state)["params"], before["params"], "params after an lr=nan step")


@pytest.mark.parametrize("nonfinite_check", ["gradients", "updates"])
def test_a_zero_over_zero_update_is_skipped_by_either_check(nonfinite_check):
    """eps = 0 and a zero kernel gradient: AdamW's kernel update is 0/0 while loss, gradient and lr are finite.
    Both checks skip that step (the new parameters' norm is NaN)."""
    trainer, state = regression_trainer(lr=1e-2, nonfinite_check=nonfinite_check, eps=0.0)
    before = jax.device_get(state)
    state, metrics = trainer.jit_train_step()(state, regression_batch(trainer, black=True), {})
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert (int(state["nonfinite"]), int(state["first_nonfinite_step"])) == (1, 1)
    assert_trees_equal(jax.device_get(state)["params"], before["params"], "params after a 0/0 update")
    state, _ = trainer.jit_train_step()(state, regression_batch(trainer), {})  # images again: a finite update
    assert int(state["nonfinite"]) == 1
    assert not np.array_equal(jax.device_get(state)["params"]["head"]["kernel"], before["params"]["head"]["kernel"])

    with pytest.raises(ValueError, match=r"config\.nonfinite_check='loss'"):
        regression_trainer(lr=1e-2, nonfinite_check="loss")


def test_bad_overrides_fail_at_flag_parsing():
    """--config.optim.lr=abc and an unknown key: absl's one-line error naming the flag, before anything runs."""
    for override, expected in (("--config.optim.lr=abc", "--config.optim.lr=abc: could not convert string to float"),
                               ("--config.optim.nope=1", "--config.optim.nope: the config has no field 'nope'")):
        proc = subprocess.run([sys.executable, str(REPO / "train.py"),
                               f"--config={REPO / 'configs' / CONFIGS['seg']}:smoke", "--workdir=/nonexistent/w",
                               override], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("overrides,error", [
    ({"init": "/nonexistent/sd", "model.arch": "init"}, r"config\.init='/nonexistent/sd' does not exist"),
    ({"init": "/nonexistent/sd"}, r"config\.init='/nonexistent/sd' does not exist"),  # arch 'tiny'
    ({"model.arch": "init"}, r"config\.model\.arch='init' reads the architecture from config\.init, which is empty"),
    ({"resume": "/nonexistent/run"}, r"config\.resume='/nonexistent/run' does not exist"),
    ({"model.class_embeddings": ""}, r"config\.model\.class_embeddings is empty"),
    ({"model.class_embeddings": "/nonexistent/ce.npy"}, r"config\.model\.class_embeddings='/nonexistent/ce\.npy'"),
    ({"nonfinite": "ignore"}, r"config\.nonfinite='ignore'"),
    ({"init_rng": "mt19937"}, r"config\.init_rng='mt19937'; use one of"),
    ({"ckpt_every": 0}, r"config\.ckpt_every=0 must be positive"),
    ({"eval.seg_crop": (64, 96)}, r"config\.eval\.seg_crop=\(64, 96\): .* multiple of 64"),
    ({"eval.seg_stride": (32, 0)}, r"config\.eval\.seg_stride=\(32, 0\): \(height, width\), each positive"),
])
def test_bad_config_values_fail_at_start(overrides, error, data_dir, tmp_path, monkeypatch):
    """train_and_evaluate (what train.py runs) fails before building the input pipeline or the model."""
    monkeypatch.setattr(pipelines, "make_train_iterator", _must_not_be_called)
    config = smoke_config("seg", data_dir, **overrides)
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        training.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists(), "a run refused at start writes nothing"


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("the run got as far as the input pipeline")


# ================================================= in-process: sharded step, pretrained weights in their shards

# diffusers configs with the shapes of presets.ARCHITECTURES['tiny'] (SD's block layout, scaled down).
TINY_SD_UNET = dict(sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=1, attention_head_dim=2,
                    cross_attention_dim=32, norm_num_groups=8,
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TINY_SD_VAE = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8)


# A ReLU input this close to 0 (in batch-normalised units) may change sign between two float32 computations of the
# same step; rounding moves these inputs by about 1e-6.
RELU_MARGIN = 1e-5


def relu_margin(task, trainer) -> Callable[[dict, dict, dict], float]:
    """(state, batch, constants) -> the smallest |input| of the head's ReLUs (each follows a batch norm, so in
    normalised units) in the train-mode forward of `batch`. ReLU is the only kink of the seg model: an input closer
    to 0 than float32's rounding may fall on either side in two equally correct computations of the step (e.g.
    sharded and unsharded), and where the map is small (the 1x1 to 4x4 levels of a 64 px crop) that one element
    moves the gradient of its channel and of everything upstream by per cent."""
    @jax.jit
    def smallest(variables, batch, constants):
        with task.compute.trace_scope():
            _, captured = task.model.apply(variables, *task.model_args(batch, constants), train=True,
                                           rngs={"dropout": jax.random.key(0)},
                                           mutable=["batch_stats", "intermediates"],
                                           capture_intermediates=lambda module, _: isinstance(module, BatchNorm))
        return jnp.min(jnp.stack([jnp.min(jnp.abs(x)) for x in jax.tree.leaves(captured["intermediates"])]))

    def margin(state, batch, constants) -> float:
        variables = {"params": trainer.info.merge(state["params"], state["frozen"]),
                     "batch_stats": state["batch_stats"]}
        return float(smallest(variables, batch, constants))
    return margin


def save_tiny_sd_root(root: str) -> str:
    """A diffusers pipeline root (unet/, vae/, model_index.json) with the tiny preset's shapes, safetensors."""
    unet = save_tiny_unet(os.path.join(root, "unet"), TINY_SD_UNET, seed=3)
    vae = save_tiny_vae(os.path.join(root, "vae"), seed=4, **TINY_SD_VAE)
    save_pipeline(root, unet=unet, vae=vae)
    return root


@pytest.fixture(scope="module")
def sd_root(tmp_path_factory) -> str:
    return save_tiny_sd_root(str(tmp_path_factory.mktemp("tiny_sd")))


@pytest.mark.slow
def test_pretrained_init_sharded_step_equals_unsharded(sd_root, data_dir, tmp_path):
    """A run started with --config.init=<SD root> --config.model.arch=init on a (data 2, fsdp 2, tensor 2) mesh:
    its step-0 state holds exactly the file's UNet (without conv_norm_out / conv_out) and VAE, already in their
    shards; a train step on that mesh equals the same step on one device within 2e-5 (relative, per leaf; 4e-5 for
    Adam's second moment, a square) or, for the few leaves that float32 cannot pin down, as closely as that step
    on the batch in reverse order; the frozen VAE stays bit-identical over steps. The batch is one none of whose
    ReLU inputs lies within rounding of the kink (relu_margin: the only place where two correct float32 steps can
    differ by more than rounding)."""
    config = smoke_config("seg", data_dir, init=sd_root, **{"model.arch": "init", "mesh.data": 2, "mesh.fsdp": 2,
                                                            "mesh.tensor": 2})
    # A visible update at step 1 (the smoke schedule warms up from 1e-6 x lr).
    config.optim.lr, config.optim.schedule.warmup_steps = 1e-3, 0
    config.model.dropout_ratio = 0.0  # dropout masks follow the batch position; the reordered reference needs none
    # The tolerances below were measured on the heads JAX's threefry draws here; the smoke configs' 'hash' heads
    # give a few leaves (a to_v kernel's first moment, a LayerNorm bias's update) up to 1.8x those, still 5-6x
    # what the batch in reverse order moves them: float32 rounding of cancelling sums either way.
    config.init_rng = "threefry2x32"
    arch = resolve_architecture(config)
    assert arch.unet == presets.architecture("tiny").unet  # read from unet/config.json
    task = make_task(config, arch)
    data = host_data_config(config, 1)
    train_iter = pipelines.make_train_iterator(data, tokenizer=task.tokenizer)
    mesh = parallel.make_mesh(dict(config.mesh), jax.devices()[:8])
    trainer = build_trainer(config, task, mesh)
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        started = start.start_state(config, trainer, ckpt, train_iter)
    ckpt.close()
    assert (started.source, started.step) == ("init", 0)
    state = started.state

    # Exactly the file's weights: the loader's tree, and two tensors read straight from the safetensors files.
    _, unet_file = load_unet(sd_root, on_host=True)
    _, vae_file = load_vae(sd_root, on_host=True)
    assert set(unet_file) >= set(OUTPUT_HEAD_PARAMS)
    assert_trees_equal(jax.device_get(state["params"]["unet"]),
                       {k: v for k, v in unet_file.items() if k not in OUTPUT_HEAD_PARAMS}, "unet at step 0")
    assert_trees_equal(jax.device_get(state["frozen"]["vae"]), vae_file, "vae at step 0")
    from safetensors.numpy import load_file

    raw_unet = load_file(os.path.join(sd_root, "unet", "diffusion_pytorch_model.safetensors"))
    np.testing.assert_array_equal(np.asarray(state["params"]["unet"]["conv_in"]["kernel"]),
                                  raw_unet["conv_in.weight"].transpose(2, 3, 1, 0))
    to_q = "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_q.weight"
    kernel = state["params"]["unet"]["down_blocks_2"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_q"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel), raw_unet[to_q].T)
    raw_vae = load_file(os.path.join(sd_root, "vae", "diffusion_pytorch_model.safetensors"))
    np.testing.assert_array_equal(np.asarray(state["frozen"]["vae"]["encoder"]["conv_in"]["kernel"]),
                                  raw_vae["encoder.conv_in.weight"].transpose(2, 3, 1, 0))
    # ... placed in their shards: each of the 8 devices holds a quarter of this (64, 64) kernel (fsdp x tensor).
    assert kernel.sharding.spec == P("fsdp", "tensor") and kernel.sharding.mesh.shape == mesh.shape
    assert {s.data.shape for s in kernel.addressable_shards} == {(32, 32)}
    assert all(not np.any(x) for x in jax.tree.leaves(jax.device_get(state["opt_state"])[0].mu))  # fresh Adam

    host0 = jax.device_get(state)
    constants = jax.device_put(task.constants, trainer.replicated)
    single = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    reference = build_trainer(config, task, single)
    # The first of the next few batches none of whose ReLU inputs lies within rounding of the kink (relu_margin).
    margins, margin = [], relu_margin(task, reference)
    with jax.set_mesh(single), nn.logical_axis_rules(reference.rules):
        for batch in train_iter:
            margins.append(margin(host0, batch, task.constants))
            if margins[-1] >= RELU_MARGIN or len(margins) == 8:
                break
    assert margins[-1] >= RELU_MARGIN, f"every batch has a ReLU input within {RELU_MARGIN} of 0: {margins}"
    sharded_step = trainer.jit_train_step()  # one jitted function for both sharded steps: traced once
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        sharded, sharded_metrics = sharded_step(state, device_batch(batch, trainer.batch_sharding), constants)
    sharded = jax.device_get(sharded)

    reference_step = reference.jit_train_step()

    def unsharded_step(batch):
        with jax.set_mesh(single), nn.logical_axis_rules(reference.rules):
            state, metrics = reference_step(jax.device_put(host0, reference.state_shardings),
                                            device_batch(batch, reference.batch_sharding),
                                            jax.device_put(task.constants, reference.replicated))
        return jax.device_get(state), jax.device_get(metrics)

    unsharded, unsharded_metrics = unsharded_step(batch)
    reordered, reordered_metrics = unsharded_step({k: v[::-1].copy() for k, v in batch.items()})

    def relative_tolerance(key: str) -> float:
        # Adam's second moment is (1 - b2) g^2: relative to the leaf's largest value, an error d in g becomes 2d.
        # (On a CI machine nu of a self-attention to_k kernel, whose gradient softmax's shift invariance makes a
        # cancelling sum, came out 3.2e-5 off; the batch in reverse order moved it by only 2e-6.)
        return 4e-5 if ".nu[" in key else 2e-5

    # What the step computed: the gradient statistics (Adam moments), the BN statistics, the metrics, and the
    # parameter updates (update_differences says why only where the gradient is resolved), each as close to the
    # unsharded step as the same step on the batch in another order is.
    for name, ours, theirs, other in (
            ("adam moments", sharded["opt_state"], unsharded["opt_state"], reordered["opt_state"]),
            ("batch_stats", sharded["batch_stats"], unsharded["batch_stats"], reordered["batch_stats"]),
            ("metrics", jax.device_get(sharded_metrics), unsharded_metrics, reordered_metrics)):
        assert_as_close_as_a_reordering(
            name, {k: (d, relative_tolerance(k) * scale) for k, (d, scale) in leaf_differences(ours, theirs).items()},
            {k: d for k, (d, _) in leaf_differences(other, theirs).items()})
    lr = config.optim.lr
    assert_as_close_as_a_reordering(
        "updates", {k: (d, 1e-3 * lr) for k, d in update_differences(
            sharded["params"], unsharded["params"], host0["params"], unsharded["opt_state"]).items()},
        update_differences(reordered["params"], unsharded["params"], host0["params"], unsharded["opt_state"]))
    assert not np.array_equal(sharded["params"]["unet"]["conv_in"]["kernel"], host0["params"]["unet"]["conv_in"]["kernel"])

    # The frozen VAE, after a second step: still the file's, bit for bit.
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        state = jax.device_put(sharded, trainer.state_shardings)
        state, _ = sharded_step(state, device_batch(next(train_iter), trainer.batch_sharding), constants)
    assert int(state["step"]) == 2
    assert_trees_equal(jax.device_get(state["frozen"]["vae"]), vae_file, "vae after 2 steps")


# ====================================================================== subprocesses: train.py and eval.py


TASK_METRICS = {"seg": ("mIoU", "mAcc", "aAcc"), "depth": ("d1", "abs_rel", "rmse"), "refer": ("oIoU", "mIoU")}
TRAIN_METRICS = ("loss", "lr", "grad_norm", "param_norm", "step_time", "images_per_sec", "nonfinite_steps")


@pytest.mark.slow
@uses_runs("seg", "depth", "refer")
@pytest.mark.parametrize("task", sorted(CONFIGS))
def test_few_step_run_then_eval_py(runs, task):
    """train.py: exit 0, checkpoints at the interval (the last one forced), metrics.jsonl, TensorBoard, config and
    versions, eval_<step>.json; the frozen VAE unchanged; eval.py on the workdir reproduces the evaluation exactly."""
    result = runs.result(task)
    workdir, log_every = result.workdir, 1 if task == "seg" else 2
    assert checkpoint_steps(workdir) == [2, 4]
    for step in (2, 4):
        assert {"state", "config", "data"} <= {p.name for p in (workdir / "checkpoints" / str(step)).iterdir()}
        assert list((workdir / "checkpoints" / str(step) / "data" / "process_0").iterdir())
    config = json.loads((workdir / "config.json").read_text())
    assert (config["task"], config["total_steps"], config["data"]["data_dir"]) == (task, 4, runs.data_dir)
    assert "jax" in json.loads((workdir / "versions.json").read_text())
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))

    lines = metrics_lines(workdir)
    train = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train] == list(range(log_every, SMOKE_STEPS + 1, log_every))
    for line in train:
        assert all(math.isfinite(line[f"train/{k}"]) for k in TRAIN_METRICS), line
        assert line["train/nonfinite_steps"] == 0
    evals = [line for line in lines if any(k.startswith("eval/") for k in line)]
    assert [line["step"] for line in evals] == [SMOKE_STEPS]
    assert all(f"eval/{k}" in evals[0] for k in TASK_METRICS[task])

    train_eval = result.train_eval
    assert train_eval["step"] == SMOKE_STEPS and train_eval["eval_batches"] == 2
    assert all(math.isfinite(train_eval[k]) for k in TASK_METRICS[task])
    result.eval.check()
    assert result.eval_json == train_eval, "eval.py differs from the evaluation at the end of training"

    first, last = read_state(workdir, 2), read_state(workdir, 4)
    assert int(last["step"]) == 4 and int(last["nonfinite"]) == 0
    assert_trees_equal(last["frozen"], first["frozen"], "frozen VAE / CLIP")
    worst, _ = max_relative_difference(last["params"], first["params"])
    assert worst > 0, "training changed no parameter"
    if task == "seg":  # the smoke schedule: linear warm-up over 2 steps from 1e-6, then poly(1.0) to 0 at step 4
        lr = [line["train/lr"] for line in train]
        expected = [8e-5 * (1 - s / 4) * (1 - (1 - s / 2) * (1 - 1e-6) if s < 2 else 1.0) for s in range(4)]
        np.testing.assert_allclose(lr, expected, rtol=1e-6)


@pytest.mark.slow
@uses_runs("seg", "seg_long_intervals")
def test_a_run_shorter_than_its_intervals_logs_checkpoints_and_evaluates_its_last_step(runs):
    """log_every = ckpt_every = 5 over a 4-step run: the last step is still logged (the mean loss of the 4 steps),
    checkpointed (forced) and evaluated, and the intervals change nothing in training: the state and evaluation
    equal the reference seg run's (log_every 1, ckpt_every 2) bit for bit. (The trainer's loop is the same for
    every task; test_few_step_run_then_eval_py runs each.)"""
    workdir, run = runs.result("seg_long_intervals")
    run.check()
    reference = runs.result("seg")
    assert checkpoint_steps(workdir) == [SMOKE_STEPS]
    assert_trees_equal(read_state(workdir, SMOKE_STEPS), read_state(reference.workdir, SMOKE_STEPS),
                       "state at the last step vs the reference run")
    lines, reference_lines = metrics_lines(workdir), metrics_lines(reference.workdir)
    train = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train] == [SMOKE_STEPS]
    reference_losses = [line["train/loss"] for line in reference_lines if "train/loss" in line]
    assert len(reference_losses) == SMOKE_STEPS
    assert train[0]["train/loss"] == pytest.approx(np.mean(reference_losses), rel=1e-6)
    assert [line["step"] for line in lines if any(k.startswith("eval/") for k in line)] == [SMOKE_STEPS]
    assert json.loads((workdir / f"eval_{SMOKE_STEPS}.json").read_text()) == reference.train_eval


def _check_resumed_like_reference(runs: SmokeRuns, kill: KillRun) -> None:
    reference = runs.result("seg").workdir
    assert kill.restart.returncode == 0, f"{kill.description}\nrestart failed:\n{kill.restart.err[-5000:]}"
    assert checkpoint_steps(kill.workdir)[-1] == SMOKE_STEPS, kill.description
    assert not list((kill.workdir / "checkpoints").glob("*tmp*")), f"{kill.description}: tmp directories left"
    assert_trees_equal(read_state(kill.workdir, SMOKE_STEPS), read_state(reference, SMOKE_STEPS),
                       f"{kill.description}: final state vs the uninterrupted run")
    for step in checkpoint_steps(kill.workdir):
        assert_trees_equal(read_state(kill.workdir, step), read_state(reference, step), f"{kill.description}: {step}")
    assert json.loads((kill.workdir / f"eval_{SMOKE_STEPS}.json").read_text()) == runs.result("seg").train_eval


@pytest.mark.slow
@uses_runs("seg", "kill_random")
def test_sigkill_at_a_random_step_then_same_command_resumes_exactly(runs):
    kill = runs.result("kill_random")
    print(kill.description)  # shown on failure
    assert kill.killed.returncode in (-signal.SIGKILL, 0), f"{kill.description}\n{kill.killed.err[-3000:]}"
    _check_resumed_like_reference(runs, kill)


@pytest.mark.slow
@uses_runs("seg", "kill_in_save")
def test_sigkill_during_an_async_save_then_same_command_resumes_exactly(runs):
    kill = runs.result("kill_in_save")
    print(kill.description)
    held = int(kill.description.split("step ")[-1])
    assert kill.killed.returncode == -signal.SIGKILL, f"{kill.description}\n{kill.killed.err[-3000:]}"
    assert held not in kill.steps_after_kill and kill.steps_after_kill == list(range(2, held, 2)), kill.description
    assert any(name.startswith(f"{held}.orbax-checkpoint-tmp") for name in kill.leftovers_after_kill), kill.description
    _check_resumed_like_reference(runs, kill)


@pytest.mark.slow
@uses_runs("seg", "nan_stop")
def test_nonfinite_stop_names_the_step_and_keeps_the_last_checkpoint(runs):
    workdir, run = runs.result("nan_stop")
    assert run.returncode == 1
    assert "NonFiniteError: non-finite loss, gradient or update at train step 3 (1 such step(s) so far)" in run.err
    assert checkpoint_steps(workdir) == [2], "the step-4 checkpoint of a stopped run must not be written"
    assert_trees_equal(read_state(workdir, 2), read_state(runs.result("seg").workdir, 2), "last good checkpoint")
    assert not list(workdir.glob("eval_*.json"))


@pytest.mark.slow
@uses_runs("seg", "nan_skip")
def test_nonfinite_skip_skips_the_update_and_counts_it(runs):
    workdir, run = runs.result("nan_skip")
    run.check()
    assert checkpoint_steps(workdir) == [1, 2, 3, 4]
    states = {step: read_state(workdir, step) for step in (2, 3, 4)}
    assert_trees_equal(states[2], read_state(runs.result("seg").workdir, 2), "steps before the NaN")
    for key in ("params", "opt_state", "batch_stats"):  # step 3 was skipped: nothing moved
        assert_trees_equal({key: states[3][key]}, {key: states[2][key]}, f"{key} over the skipped step")
    assert (int(states[3]["step"]), int(states[3]["nonfinite"]), int(states[3]["first_nonfinite_step"])) == (3, 1, 3)
    assert max_relative_difference(states[4]["params"], states[3]["params"])[0] > 0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(states[4]["params"]))
    lines = {line["step"]: line for line in metrics_lines(workdir) if "train/loss" in line}
    assert (lines[2]["train/nonfinite_steps"], lines[4]["train/nonfinite_steps"]) == (0, 1)
    assert math.isfinite(json.loads((workdir / "eval_4.json").read_text())["mIoU"])


@pytest.mark.slow
@uses_runs("seg")
def test_incompatible_workdir_fails_at_start_naming_keys_and_config_differences(runs, tmp_path, monkeypatch):
    """A workdir trained with fpn_channels 32, restarted with 16: refused before anything is compiled, naming
    the mis-shaped parameters and the config field; the workdir (checkpoints, config.json) is left as it was."""
    workdir = tmp_path / "run"
    shutil.copytree(runs.result("seg").workdir, workdir)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    config = smoke_config("seg", runs.data_dir, **{"model.fpn_channels": 16})
    monkeypatch.setattr(logs, "MetricWriter", _must_not_be_called)
    with pytest.raises(checkpoint.CheckpointMismatchError) as err:
        training.train_and_evaluate(config, str(workdir))
    message = str(err.value)
    assert "does not fit the model" in message and "mis-shaped  params.head." in message  # parameters first
    assert "model.fpn_channels: checkpoint 32, this run 16" in message
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


# The two processes and the single process do the same arithmetic, except that the gradient all-reduce runs
# across processes (gloo) in one and inside one process in the other, which may sum in another order.
MULTIPROCESS_RTOL = 1e-5


@pytest.mark.slow
@uses_runs("multiprocess")
def test_two_processes_train_like_one_process_with_the_same_global_batches(runs):
    """2 processes x 2 devices (fsdp across the processes, tensor inside) against 1 process x 4 devices.

    What "the same global batch" means here: with the per-host input pipeline, process i reads its own TFDS subsplit
    with its own shuffle and augmentation seeds, so a 1-process run of the same command reads a different stream by
    construction and would train to different parameters. The 1-process run is therefore fed, step by step, the
    concatenation of the two per-host streams (tests/run/train_worker.py --emulate_processes=2), which is exactly the
    global array the two processes assemble with make_array_from_process_local_data (process 0's devices come
    first in the mesh). Any difference in how the processes assemble batches (order included: dropout masks depend
    on the position in the batch), reduce gradients, synchronise BatchNorm statistics or restore / save their
    shards would show up below. Evaluation covers the whole validation split in both layouts (16 examples), so the
    metrics agree too.
    """
    result = runs.result("multiprocess")
    for run in (*result["processes"], result["single"]):
        run.check()
    two, one = result["two"], result["one"]
    assert checkpoint_steps(two) == checkpoint_steps(one) == [2, 4]
    data_items = sorted(p.name for p in (two / "checkpoints" / "4" / "data").iterdir() if p.is_dir())
    assert data_items == ["process_0", "process_1"]  # one tf.data iterator per process
    a, b = read_state(two, 4), read_state(one, 4)
    assert int(a["step"]) == int(b["step"]) == 4
    worst, where = max_relative_difference({k: a[k] for k in ("params", "opt_state", "batch_stats")},
                                           {k: b[k] for k in ("params", "opt_state", "batch_stats")})
    assert worst <= MULTIPROCESS_RTOL, f"states differ by {worst:.2e} at {where}"
    # Host 0 alone writes the logs, and both layouts log the same losses.
    two_lines, one_lines = metrics_lines(two), metrics_lines(one)
    assert [l["step"] for l in two_lines] == [l["step"] for l in one_lines]
    for x, y in zip(two_lines, one_lines):
        for key in ("train/loss", "train/grad_norm"):
            if key in y:
                assert x[key] == pytest.approx(y[key], rel=1e-5), (key, x["step"])
    two_eval, one_eval = (json.loads((d / "eval_4.json").read_text()) for d in (two, one))
    assert two_eval["eval_batches"] == one_eval["eval_batches"] == 2
    for key in ("mIoU", "mAcc", "aAcc"):
        assert two_eval[key] == pytest.approx(one_eval[key], abs=1e-3), key

"""Checkpoints: the train state, the resolved config and each process's tf.data iterator, in one Orbax step.

Layout of `<directory>/<step>/` (an Orbax CheckpointManager step, written in `<step>.orbax-checkpoint-tmp-*` and
renamed only when every item of every process is written, so a step is complete or absent):
  state/                 the train state (sharded jax arrays; restored straight into the target shardings)
  config/metadata        the resolved config as JSON (written by the primary process only)
  data/process_<i>/      process i's tf.data iterator (`tf.train.Checkpoint(iterator=...)`), one per process

The iterator item has its own CheckpointHandler (`DataIteratorHandler`). Orbax runs non-async handlers to completion
inside `save()` on every process, so the iterator is captured at exactly the step being saved, while the arrays are
written in the background. A run killed at any moment (SIGKILL included, also mid-save) leaves at most a tmp
directory, which `latest_step()` ignores and the next CheckpointManager deletes (in the background, finished
before its first save).

All processes call `save` and `restore` (Orbax coordinates them); vpd_jax/run/start.py decides where a run's state
comes from. A step that cannot be read (a file truncated or deleted by hand, a disk error) raises
CheckpointReadError naming the step directory and what the reader said.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

STATE, CONFIG, DATA = "state", "config", "data"
_MAX_LISTED = 10
_MAX_DETAIL = 300  # characters of a reader's error in CheckpointReadError (tensorstore's repeat whole specs)


# --------------------------------------------------------------------------------- the data-iterator item


def _iterator_checkpoint(iterator: Any) -> tuple[Callable[[str], Any], Callable[[str], None]]:
    """(save(prefix), restore(prefix)) for a `vpd_jax.data.iterator.DataIterator`-like object (with its own
    `save`/`restore`) or a raw tf.data iterator."""
    if hasattr(iterator, "save") and hasattr(iterator, "restore"):
        return iterator.save, iterator.restore
    import tensorflow as tf  # only when a raw tf.data iterator is checkpointed

    if not isinstance(iterator, tf.data.Iterator):
        raise TypeError(f"cannot checkpoint a {type(iterator).__name__}: expected a tf.data iterator or an object "
                        "with save(path_prefix) and restore(path)")
    ckpt = tf.train.Checkpoint(iterator=iterator)
    return ckpt.write, lambda prefix: ckpt.read(prefix).assert_consumed()


def _root_cause(err: BaseException) -> str:
    """'Type: first line' of the innermost exception behind `err` (tensorstore's says which file and what is
    wrong with it, e.g. a byte range past the end of a truncated file; the outer ones repeat whole specs)."""
    for _ in range(20):  # a bound, in case of a cycle
        if (err.__cause__ or err.__context__) is None:
            break
        err = err.__cause__ or err.__context__
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:_MAX_DETAIL] if text else ''}"


def _process_dirs(directory: epath.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("process_")) if directory.exists() else []


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves / restores this process's data iterator under `<item dir>/process_<jax.process_index()>/`."""

    _PREFIX = "iterator"

    def save(self, directory: epath.Path, args: "DataIteratorSave"):
        path = epath.Path(directory) / f"process_{jax.process_index()}"
        path.mkdir(parents=True, exist_ok=True)
        save, _ = _iterator_checkpoint(args.iterator)
        save(str(path / self._PREFIX))

    def restore(self, directory: epath.Path, args: "DataIteratorRestore"):
        directory = epath.Path(directory)
        path = directory / f"process_{jax.process_index()}"
        if not path.exists():
            raise FileNotFoundError(
                f"{directory}: no data-iterator state for process {jax.process_index()} of {jax.process_count()} "
                f"(the checkpoint has {_process_dirs(directory)}); the input pipeline state cannot be re-split "
                "across a different number of processes")
        _, restore = _iterator_checkpoint(args.iterator)
        restore(str(path / self._PREFIX))
        return args.iterator

    def metadata(self, directory: epath.Path):
        return {"processes": _process_dirs(epath.Path(directory))}


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    iterator: Any  # restored in place


# ------------------------------------------------------------------------------------------- tree checks


class CheckpointMismatchError(ValueError):
    """A checkpoint's state does not fit the model: lists the first missing, unexpected and mis-shaped keys."""


class CheckpointReadError(ValueError):
    """A checkpoint step that cannot be read: names its directory and the reader's error."""


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'a.b.0.c' -> shape, with keys spelled as Orbax stores them (dataclass fields and namedtuples by name)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(k) for k in path): tuple(np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape)
            for path, leaf in leaves}


def _params_first(key: str) -> tuple[bool, str]:
    """Sort key listing model parameters before the optimizer slots and statistics that repeat their names."""
    return not key.startswith("params."), key


def check_state_matches(saved: Any, target: Any, source: str) -> None:
    """Raise CheckpointMismatchError unless `saved` (Orbax metadata) and `target` have the same keys and shapes."""
    have, want = _flat_shapes(saved), _flat_shapes(target)
    missing = sorted(want.keys() - have.keys(), key=_params_first)
    unexpected = sorted(have.keys() - want.keys(), key=_params_first)
    misshaped = sorted((k for k in want.keys() & have.keys() if tuple(have[k]) != tuple(want[k])), key=_params_first)
    if not (missing or unexpected or misshaped):
        return
    lines = [f"checkpoint {source} does not fit the model: {len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(misshaped)} mis-shaped entries (first {_MAX_LISTED} of each)"]
    lines += [f"  missing     {k}: model has {want[k]}" for k in missing[:_MAX_LISTED]]
    lines += [f"  unexpected  {k}: checkpoint has {have[k]}" for k in unexpected[:_MAX_LISTED]]
    lines += [f"  mis-shaped  {k}: checkpoint has {tuple(have[k])}, model has {want[k]}" for k in misshaped[:_MAX_LISTED]]
    raise CheckpointMismatchError("\n".join(lines))


# Top-level scalar entries of the train state that checkpoints written before them lack (vpd_jax/run/trainer.py
# NONFINITE_COUNTERS): such a checkpoint restores with them zero, what they are at the start of a run.
ADDED_STATE_ENTRIES = ("nonfinite_streak", "longest_nonfinite_streak", "longest_nonfinite_streak_end")


def _entries_added_since(saved: Any, target: Any) -> list[str]:
    """The ADDED_STATE_ENTRIES that `target` (a state dict) has and the saved state tree does not."""
    if not isinstance(target, dict) or not hasattr(saved, "keys"):
        return []
    return [name for name in ADDED_STATE_ENTRIES if name in target and name not in saved.keys()]


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a state of jax arrays, as `restore` wants its target."""

    def to_abstract(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(to_abstract, state)


def _check_target_shardings(abstract_state: Any) -> None:
    unsharded = [".".join(_key_name(k) for k in path)
                 for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
                 if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None]
    if unsharded:
        raise ValueError(f"restore target leaves without a sharding (e.g. {unsharded[:3]}): give every "
                         "ShapeDtypeStruct the sharding to restore into (see abstract_like)")


# ------------------------------------------------------------------------------------------- the manager


def config_to_json(config: Any) -> dict:
    """A JSON-able dict of a ConfigDict / mapping (values JSON cannot hold become their repr)."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort(sort_keys=True))
    return json.loads(json.dumps(dict(config), default=repr, sort_keys=True))


class Checkpointer:
    """A CheckpointManager over `directory` with the state / config / data items.

    save_interval_steps and max_to_keep are Orbax's; `async_save` writes arrays in the background (call
    `wait_until_finished()` before reading them elsewhere, and `close()` at exit). `read_only` opens another run's
    checkpoints (config.resume) without touching them.
    """

    def __init__(self, directory: str | epath.Path, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
                 async_save: bool = True, read_only: bool = False):
        # Orbax (tensorstore) needs an absolute path: a relative workdir (`--workdir=runs/x`) is taken from the
        # current directory; gs:// and other URLs stay as they are.
        self.directory = epath.Path(directory if "://" in os.fspath(directory) else os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else save_interval_steps,
            # Orbax's default policy also saves the first step of a run with no checkpoint yet; ours saves on the
            # interval only (plus a preemption notice), so a run's checkpoint steps do not depend on restarts.
            save_decision_policy=None if read_only else ocp.checkpoint_managers.AnySavePolicy([
                ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,  # leftovers of a run killed mid-save
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler(),
                           DATA: DataIteratorHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(self, step: int, state: Any, *, data_iterator: Any = None, config: Any = None,
             force: bool = False) -> bool:
        """Save `state` (and the iterator / config, when given) as `step` if the interval says so (or `force`).

        Every process must call this with its own iterator. Returns whether a save was started.
        """
        items = {STATE: ocp.args.StandardSave(state)}
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(config_to_json(config))
        if data_iterator is not None:
            items[DATA] = DataIteratorSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def has_data(self, step: int) -> bool:
        return (self._step_dir(step) / DATA).exists()

    def data_processes(self, step: int) -> list[str]:
        """The processes whose data iterators `step` holds ('process_0', ...)."""
        return _process_dirs(self._step_dir(step) / DATA)

    def check_fits(self, step: int, abstract_state: Any) -> list[str]:
        """Raises CheckpointMismatchError (naming keys) unless the state saved at `step` has the keys and shapes of
        `abstract_state`, but for ADDED_STATE_ENTRIES it predates; returns those. Reads only the metadata."""
        with self._reading(step):
            saved = self.manager.item_metadata(step)[STATE]
        saved = getattr(saved, "tree", saved)
        if not saved and jax.tree.leaves(abstract_state):
            raise CheckpointReadError(f"checkpoint {self._step_dir(step)} cannot be read: its state has no readable "
                                      f"metadata ({self._step_dir(step) / STATE / '_METADATA'} missing or empty)")
        added = _entries_added_since(saved, abstract_state)
        check_state_matches(saved, {k: v for k, v in abstract_state.items() if k not in added} if added
                            else abstract_state, str(self._step_dir(step)))
        return added

    def restore(self, step: int, abstract_state: Any, *, data_iterator: Any = None) -> Any:
        """The state of `step`, restored into `abstract_state`'s shardings; restores `data_iterator` in place.

        Raises CheckpointMismatchError (naming keys) when the saved tree does not fit `abstract_state`, and
        CheckpointReadError when the step cannot be read.
        """
        abstract_state = abstract_like(abstract_state)
        _check_target_shardings(abstract_state)
        added = self.check_fits(step, abstract_state)
        target = {k: v for k, v in abstract_state.items() if k not in added} if added else abstract_state
        items = {STATE: ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            if not self.has_data(step):
                raise FileNotFoundError(f"checkpoint {self._step_dir(step)} has no data-iterator state: it was saved "
                                        "without one, so the input stream cannot continue where it stopped")
            items[DATA] = DataIteratorRestore(data_iterator)
        with self._reading(step):
            state = self.manager.restore(step, args=ocp.args.Composite(**items))[STATE]
        if added:
            logging.info("%s predates the state entries %s: they start at zero", self._step_dir(step), added)
            state = {**state, **{k: jax.device_put(np.zeros(abstract_state[k].shape, abstract_state[k].dtype),
                                                   abstract_state[k].sharding) for k in added}}
        return state

    def restore_config(self, step: int) -> dict | None:
        """The config saved with `step` (a JSON dict), or None when it was saved without one."""
        if not (self._step_dir(step) / CONFIG).exists():
            return None
        with self._reading(step):
            return self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    @contextlib.contextmanager
    def _reading(self, step: int):
        """Turns a reader's error on `step` into a CheckpointReadError naming the step directory (errors this module
        raises itself, and a missing data-iterator state, already name it)."""
        try:
            yield
        except (CheckpointMismatchError, CheckpointReadError):
            raise
        except FileNotFoundError as err:
            if str(self._step_dir(step)) in str(err):
                raise
            raise CheckpointReadError(f"checkpoint {self._step_dir(step)} cannot be read: a file is missing "
                                      f"({err})") from err
        except Exception as err:  # tensorstore's, Orbax's and JSON's errors do not name the step
            raise CheckpointReadError(f"checkpoint {self._step_dir(step)} cannot be read: {_root_cause(err)} (the "
                                      "full error is chained below)") from err

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

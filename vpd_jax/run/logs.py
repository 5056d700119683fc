"""Run logs: metrics.jsonl and TensorBoard summaries (scalars, evaluation panels; process 0), the console progress
line, run metadata.

A workdir holds, besides checkpoints/: config.json (the resolved config of the latest start) and versions.json
(library versions and devices of that start). When a restart's differs, the previous one is kept as config.1.json,
config.2.json, ... (versions.1.json, ...), oldest first, so the record of a run is never overwritten.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from importlib import metadata
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-cpu", "tensorflow", "tensorflow-datasets",
             "ml-collections", "numpy")


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions["devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}, {jax.process_count()} process(es)"
    return versions


def check_workdir(workdir: str) -> None:
    """Fails, naming the path, unless the run can write `workdir`: an existing directory it may write, or one it
    may create; and the entries it writes there, when they exist, of the right kind. Writes nothing. URLs
    (gs://...) are left to their storage client."""
    if "://" in workdir:
        return
    path = os.path.abspath(workdir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    what = "--workdir" if existing == path else f"--workdir={workdir!r} cannot be created:"
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"{what} {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {existing} is not writable by this user")
    for name, is_dir in (("checkpoints", True), ("tensorboard", True), ("config.json", False),
                         ("metrics.jsonl", False)):
        entry = os.path.join(path, name)
        if os.path.exists(entry) and os.path.isdir(entry) != is_dir:
            raise ValueError(f"--workdir: {entry} is a {'file' if is_dir else 'directory'}; the run writes a "
                             f"{'directory' if is_dir else 'file'} there")


def write_run_metadata(workdir: str, config) -> None:
    """The resolved config and the library versions, next to the checkpoints (process 0 only); a previous,
    different record is kept (module docstring)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    write_keeping_previous(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2, sort_keys=True))
    write_keeping_previous(os.path.join(workdir, "versions.json"), json.dumps(library_versions(), indent=2))


def write_keeping_previous(path: str, text: str) -> str | None:
    """Writes `text` to `path` atomically; a different file already there is first kept as `<stem>.<n><ext>` (the
    first free n from 1). Returns the kept copy's path, or None."""
    kept = None
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return None
        stem, ext = os.path.splitext(path)
        n = 1
        while os.path.exists(f"{stem}.{n}{ext}"):
            n += 1
        kept = f"{stem}.{n}{ext}"
        shutil.copy2(path, kept)
        logging.info("%s differs from this start's; the previous one is kept as %s", path, kept)
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)  # a crash leaves the old file or the new one, never half of one
    return kept


class MetricWriter:
    """Appends {"step": s, ...} lines to <workdir>/metrics.jsonl and scalar summaries to TensorBoard, and image
    summaries (`write_images`) to TensorBoard only, on process 0; other processes write nothing."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        import tensorflow as tf  # the input pipeline has imported it already

        self._tf = tf
        self._summary = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, Any], prefix: str = "") -> None:
        if not self.active:
            return
        values = {f"{prefix}{k}": v for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}, default=float) + "\n")
        self._jsonl.flush()
        with self._summary.as_default():
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self._tf.summary.scalar(name, value, step=int(step))
        self._summary.flush()

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """One TensorBoard image summary per name: (H, W, 3) uint8 RGB pictures."""
        if not self.active or not images:
            return
        with self._summary.as_default():
            for name, image in images.items():
                self._tf.summary.image(name, np.asarray(image, np.uint8)[None], step=int(step), max_outputs=1)
        self._summary.flush()

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._summary.close()


class Progress:
    """The console progress line: the interval's mean loss, the learning rate, step time, throughput and an ETA from
    the steps run in this process since the first one, whose time is compilation (`compiled` marks its end)."""

    def __init__(self, first_step: int, total_steps: int, examples_per_step: int):
        self.first_step, self.total_steps, self.examples_per_step = first_step, total_steps, examples_per_step
        self.start = self._last_time = time.perf_counter()
        self._last_step = first_step

    def compiled(self, step: int, since: float) -> None:
        """Step `step`, the first of this process, has run (compiling took most of it): the clock starts now."""
        now = time.perf_counter()
        logging.info("train step compiled and run once in %s", _duration(now - since))
        self.first_step, self._last_step = step, step
        self.start = self._last_time = now

    def update(self, step: int, loss: float | None = None, lr: float | None = None) -> dict[str, float]:
        """Rates since the previous call; logs a progress line."""
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        step_time = (now - self._last_time) / steps
        self._last_step, self._last_time = step, now
        done = step - self.first_step
        average = (now - self.start) / max(done, 1)
        eta = average * (self.total_steps - step)
        loss_text = "" if loss is None else f"  loss {loss:.4f}"
        lr_text = "" if lr is None else f"  lr {lr:.3g}"
        logging.info("step %d/%d%s%s  %.3f s/step  %.1f img/s  ETA %s", step, self.total_steps, loss_text, lr_text,
                     step_time, self.examples_per_step / step_time, _duration(eta) if done else "(measuring)")
        return {"step_time": step_time, "images_per_sec": self.examples_per_step / step_time}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"

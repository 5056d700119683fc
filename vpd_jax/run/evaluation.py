"""Evaluation over the (padded, per-host) eval pipeline: periodic in training and standalone in eval.py.

Every host runs the same number of eval batches (the pipeline pads with `valid = False` examples); the jitted
step returns the task's metric statistics of the global batch replicated on every device, so each host sums
identical totals and any host could report them. Results go to the log, metrics.jsonl and eval_<step>.json.
"""
from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from vpd_jax.data import pipelines
from vpd_jax.parallel import device_batch
from vpd_jax.run import logs
from vpd_jax.run.setup import setup
from vpd_jax.run.start import restore_step
from vpd_jax.run.trainer import Trainer


class Evaluator:
    def __init__(self, trainer: Trainer, data: ml_collections.ConfigDict):
        self.trainer, self.data = trainer, data
        task = trainer.task
        self._step = jax.jit(
            lambda variables, batch, constants: task.eval_statistics(variables, batch, constants),
            out_shardings=trainer.replicated)

    def evaluate(self, state: dict, max_batches: int = 0) -> dict[str, Any]:
        """The task's metrics on the eval split (EMA parameters when the optimizer keeps them)."""
        trainer = self.trainer
        variables = trainer.variables(state, use_ema=trainer.config.optim.ema_decay > 0)
        constants = jax.device_put(trainer.task.constants, trainer.replicated)
        metric = trainer.task.new_metric()
        iterator = pipelines.make_eval_iterator(self.data, tokenizer=trainer.task.tokenizer)
        batches = 0
        logging.info("evaluating on %s (the first batch compiles the eval step)", self.data.eval_split)
        for batch in iterator:
            statistics = self._step(variables, device_batch(batch, trainer.batch_sharding), constants)
            metric.update(jax.device_get(statistics))
            batches += 1
            if max_batches and batches >= max_batches:
                break
        result = metric.result()
        result["eval_batches"] = batches
        return result

    def run_and_log(self, state: dict, step: int, workdir: str, writer) -> dict[str, Any]:
        result = self.evaluate(state, self.trainer.config.eval_max_batches)
        scalars = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        logging.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
        per_class = per_class_scalars(result)
        if per_class:
            logging.info("eval at step %d, per class:\n%s", step, per_class_table(result))
        writer.write(step, {**scalars, **per_class}, prefix="eval/")
        write_result(workdir, step, result)
        return result


def per_class_scalars(result: dict[str, Any]) -> dict[str, float]:
    """'<metric>/<class name>' for every per-class list of a result that names its classes ('classes')."""
    names = result.get("classes") or []
    return {f"{metric}/{name}": float(value) for metric, values in result.items()
            if metric != "classes" and isinstance(values, list) and len(values) == len(names) and names
            for name, value in zip(names, values)}


def per_class_table(result: dict[str, Any]) -> str:
    """A text table: one row per class, one column per per-class metric (NaN: the class is absent)."""
    names = result["classes"]
    columns = [m for m, v in result.items() if m != "classes" and isinstance(v, list) and len(v) == len(names)]
    width = max(len(n) for n in names)
    lines = [f"  {'class':{width}s}  " + "  ".join(f"{c:>7s}" for c in columns)]
    lines += [f"  {name:{width}s}  " + "  ".join(f"{float(result[c][i]):7.4f}" for c in columns)
              for i, name in enumerate(names)]
    return "\n".join(lines)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict[str, Any]:
    """eval.py: evaluates the checkpoint of `step` (default: the latest) in `workdir`/checkpoints, or, when the
    workdir has none, config.resume; writes eval_<step>.json to `workdir`."""
    root = os.path.join(workdir, "checkpoints")
    if not (os.path.isdir(root) and os.listdir(root)):
        if not config.resume:
            raise FileNotFoundError(f"no checkpoints in {root} and config.resume is empty: nothing to evaluate")
        root = config.resume
    run = setup(config)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.trainer.rules):
        state, step = restore_step(run.trainer, root, step)
        result = Evaluator(run.trainer, run.data).evaluate(state, config.eval_max_batches)
    logging.info("eval of %s step %d: %s", root, step, result)
    write_result(workdir, step, result)
    return result


def write_result(workdir: str, step: int, result: dict[str, Any]) -> str:
    """<workdir>/eval_<step>.json (process 0); an earlier, different result of that step is kept as
    eval_<step>.<n>.json, never overwritten."""
    path = os.path.join(workdir, f"eval_{step}.json")
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        logs.write_keeping_previous(path, json.dumps({"step": int(step), **result}, indent=2, default=_jsonable))
    return path


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")

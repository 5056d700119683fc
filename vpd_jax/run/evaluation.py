"""Evaluation over the (padded, per-host) eval pipeline: periodic in training and standalone in eval.py.

Every host runs the same number of eval batches (the pipeline pads with `valid = False` examples); the jitted
step returns the task's metric statistics of the global batch replicated on every device, so each host sums
identical totals and any host could report them. Results go to the log, metrics.jsonl and eval_<step>.json.

A training run's evaluations also write panels of the first `config.eval_panels` eval images to TensorBoard
(`EvalPanels`): per image a row input | ground truth | prediction (visualize.eval_panel).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vpd_jax import visualize
from vpd_jax.data import pipelines
from vpd_jax.data.class_names import segmentation_class_names
from vpd_jax.data.iterator import DataIterator
from vpd_jax.parallel import device_batch, place
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
        self.panels = EvalPanels(trainer, data, trainer.config.eval_panels)

    def evaluate(self, state: dict, max_batches: int = 0) -> dict[str, Any]:
        """The task's metrics on the eval split (EMA parameters when the optimizer keeps them)."""
        return self._evaluate(state, max_batches, panels=False)[0]

    def _evaluate(self, state: dict, max_batches: int, panels: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(`evaluate`'s result, the panels of the first batch when `panels`: EvalPanels.pictures)."""
        trainer = self.trainer
        variables = trainer.variables(state, use_ema=trainer.config.optim.ema_decay > 0)
        constants = jax.device_put(trainer.task.constants, trainer.replicated)
        metric = trainer.task.new_metric()
        # The text stays in the host batches (device_batch leaves strings out): the panels' captions.
        iterator = DataIterator(pipelines.make_eval_dataset(self.data), trainer.task.tokenizer,
                                self.data.text_max_length, keep_text=True)
        batches, pictures = 0, {}
        logging.info("evaluating on %s (the first batch compiles the eval step%s)", self.data.eval_split,
                     " and, at the first evaluation, the panels' forward" if panels and self.panels.count > 0 else "")
        for batch in iterator:
            if panels and batches == 0:
                pictures = self.panels.pictures(variables, batch, constants)
            statistics = self._step(variables, device_batch(batch, trainer.batch_sharding), constants)
            metric.update(jax.device_get(statistics))
            batches += 1
            if max_batches and batches >= max_batches:
                break
        result = metric.result()
        result["eval_batches"] = batches
        return result, pictures

    def run_and_log(self, state: dict, step: int, workdir: str, writer) -> dict[str, Any]:
        result, pictures = self._evaluate(state, self.trainer.config.eval_max_batches, panels=True)
        scalars = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        logging.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
        per_class = per_class_scalars(result)
        if per_class:
            logging.info("eval at step %d, per class:\n%s", step, per_class_table(result))
        writer.write(step, {**scalars, **per_class}, prefix="eval/")
        writer.write_images(step, pictures)
        write_result(workdir, step, result)
        return result


# The kind of picture (visualize.eval_panel) of each eval pipeline's targets and predictions.
PANEL_KINDS = {"seg": "labels", "depth": "depth", "refer": "mask", "phrasecut": "probability"}
# The eval batch key of the ground truth of each kind.
_TRUTH = {"labels": "label", "depth": "depth", "mask": "mask", "probability": "mask"}


class EvalPanels:
    """TensorBoard pictures of the first `count` valid examples of process 0's first eval batch, one per example
    (`eval_panels/<i>`): a row input | ground truth | prediction drawn as predict.py draws the task's outputs
    (visualize.eval_panel: segmentation colour maps with a legend, depth colour maps over one range, referring masks
    and LD-ZNet probabilities over the image, with the phrase).

    The prediction is what the metrics score: Task.eval_predictions (the test protocol: slide windows, test ratios
    and flips for segmentation, scaled to the image's size; shift windows and flips for depth; the referring
    argmax) with the evaluated variables on the eval image as the pipeline gives it, cropped to its valid size;
    for a task without eval_predictions (LD-ZNet) the forward's sigmoid.
    A task with several outputs per image (the probe's one map per probe) gets no panels (logged once).

    Cost: one jitted forward of `count` examples (rounded up to a multiple of the devices that shard the batch),
    compiled at the first evaluation only, since the first eval batch is the same at every evaluation. Every
    process runs it (process 0's examples, broadcast); process 0 draws.
    """

    def __init__(self, trainer: Trainer, data: ml_collections.ConfigDict, count: int):
        self.trainer, self.count, self.pipeline = trainer, count, data.task
        self.kind = PANEL_KINDS.get(data.task)
        num_classes = getattr(trainer.task, "num_classes", None)  # tasks whose outputs are class labels
        self.names = segmentation_class_names(data.name, num_classes) if self.kind == "labels" else []
        self._skipped = False
        kind, task = self.kind, trainer.task

        def forward(variables, batch, constants):
            predictions = task.eval_predictions(variables, batch, constants)  # through the test protocol
            if predictions is not None:
                return predictions
            return _prediction(kind, task.apply(variables, batch, constants, train=False)[0])

        self._forward = jax.jit(forward, out_shardings=trainer.replicated)

    def pictures(self, variables: dict, batch: dict, constants: dict) -> dict[str, np.ndarray]:
        """{'eval_panels/<i>': (H, W, 3) uint8} of a host eval batch (numpy, with `valid`; text for captions) on
        process 0; {} elsewhere, and when there is nothing to draw. Every process must call it (collectives)."""
        if self.count <= 0 or self._skipped:
            return {}
        if self.kind is None:
            return self._skip(f"no pictures for the targets of the {self.pipeline!r} pipeline")
        rows = np.flatnonzero(np.asarray(batch["valid"]))[: self.count]
        examples = _from_process_0({k: np.asarray(v)[rows] for k, v in batch.items()
                                    if k != "valid" and np.asarray(v).dtype.kind in "biuf"})
        count = len(examples["image"])
        if count == 0:
            return {}
        shards = batch_devices(self.trainer)
        padded = -(-count // shards) * shards
        inputs = {k: place(np.concatenate([v, np.zeros((padded - count, *v.shape[1:]), v.dtype)]),
                           self.trainer.batch_sharding) for k, v in examples.items()}
        predictions = self._forward(variables, inputs, constants)
        if predictions is None:
            return self._skip("the model gives several maps per image (one per probe), not one prediction")
        if jax.process_index() != 0:
            return {}
        predictions = np.asarray(jax.device_get(predictions))[:count]
        texts = batch.get("text")
        return {f"eval_panels/{i}": self._draw(examples, i, predictions[i],
                                               None if texts is None else _decode(np.asarray(texts)[rows[i]]))
                for i in range(count)}

    def _draw(self, examples: dict, i: int, prediction: np.ndarray, caption: str | None) -> np.ndarray:
        image = visualize.to_uint8(examples["image"][i])
        truth = examples[_TRUTH[self.kind]][i]
        if "image_hw" in examples:  # segmentation: crop the padding; the label is at the original size
            (height, width), (label_h, label_w) = examples["image_hw"][i], examples["label_hw"][i]
            if prediction.shape == truth.shape:  # the test protocol's labels, on the label canvas
                prediction = visualize.resize_nearest(prediction[:label_h, :label_w], (height, width))
            else:
                prediction = prediction[:height, :width]
            image = image[:height, :width]
            truth = visualize.resize_nearest(truth[:label_h, :label_w], (height, width))
        if self.kind == "probability":
            truth = (truth[..., 0] > 0.5).astype(np.int32)  # the metric's foreground
        return visualize.eval_panel(image, self.kind, truth, prediction, names=self.names, caption=caption)

    def _skip(self, reason: str) -> dict:
        logging.info("eval panels (config.eval_panels=%d): none, %s", self.count, reason)
        self._skipped = True
        return {}


def _prediction(kind: str | None, output: jax.Array) -> jax.Array | None:
    """The forward's output as the panel's prediction (EvalPanels); None when it is not one map per image."""
    if kind in ("labels", "mask"):
        return jnp.argmax(output, -1).astype(jnp.int32)
    if kind == "depth":
        return (output[..., 0] if output.ndim == 4 else output).astype(jnp.float32)
    if output.shape[-1] != 1:
        return None
    return jax.nn.sigmoid(output[..., 0].astype(jnp.float32))


def _decode(text) -> str:
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def _from_process_0(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Process 0's arrays on every process (their shapes may differ between hosts: segmentation eval batches are
    padded per host)."""
    if jax.process_count() == 1:
        return arrays
    keys = sorted(arrays)
    shapes = multihost_utils.broadcast_one_to_all(
        np.concatenate([np.asarray(arrays[k].shape, np.int32) for k in keys]))
    template, start = {}, 0
    for k in keys:
        rank = arrays[k].ndim
        template[k] = np.zeros(tuple(int(d) for d in shapes[start:start + rank]), arrays[k].dtype)
        start += rank
    received = multihost_utils.broadcast_one_to_all(arrays if jax.process_index() == 0 else template)
    return {k: np.asarray(v).astype(arrays[k].dtype) for k, v in received.items()}


def batch_devices(trainer: Trainer) -> int:
    """How many devices the batch is split over (the mesh axes of its sharding: data x fsdp)."""
    return math.prod(trainer.mesh.shape[axis] for axis in trainer.batch_sharding.spec[0])


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

"""`make demo`: build vpd_shapes, train VPD segmentation and depth from scratch on the CPU, evaluate, draw.

  python -m vpd_jax.apps.demo --workdir=runs/demo [--steps=N]

Writes under the workdir: seg/ and depth/ (checkpoints, metrics.jsonl, TensorBoard logs, eval_<step>.json),
panels/seg.png and panels/depth.png (input, ground truth, prediction, per-class cross-attention maps / depth
colour maps with a colour bar), and summary.json with the final metrics next to the untrained model's and a
model-free baseline's (seg: every pixel gets its most frequent training label; depth: every pixel its mean training
depth), scored on the same validation images with the same metric; for segmentation also per class.
A workdir that already holds finished runs is evaluated and drawn again without retraining.
"""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
from absl import app, flags

from vpd_jax import metrics, visualize
from vpd_jax.run import launch

flags.DEFINE_string("workdir", "runs/demo", "Where the demo writes everything.")
flags.DEFINE_integer("steps", None, "Training steps per task (default: the demo config's).")
flags.DEFINE_integer("panel_images", 4, "Validation images drawn per task.")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILE = os.path.join(REPO, "configs", "demo.py")
HEADLINE = {"seg": ("mIoU", "higher is better"), "depth": ("rmse", "metres, lower is better")}
BASELINE = {"seg": "the majority training label of each pixel", "depth": "the mean training depth of each pixel"}


def demo_config(task: str, workdir: str, steps: int | None):
    spec = importlib.util.spec_from_file_location("demo_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(task)
    config.data.data_dir = os.path.join(workdir, "tfds")
    if steps is not None:
        config.total_steps = steps
        config.ckpt_every = steps
        config.log_every = max(1, min(config.log_every, steps))
        if task == "seg":
            config.optim.schedule.warmup_steps = min(config.optim.schedule.warmup_steps, max(steps // 2, 1))
        else:
            config.steps_per_epoch = max(1, steps // 2)
    config.lock()
    return config


def validation_scenes(config, count: int):
    """The first `count` validation scenes of the demo's vpd_shapes builder config, rendered again."""
    from vpd_jax.data import shapes
    from vpd_jax.data.builders.vpd_shapes import VpdShapes

    builder_config = {c.name: c for c in VpdShapes.BUILDER_CONFIGS}[config.data.name.split("/")[1]]
    scenes = shapes.iter_scenes(builder_config.seed, "validation", count, builder_config.shapes)
    return [scene for _, scene in scenes]


def split_arrays(config, split: str, feature: str) -> np.ndarray:
    """One feature ('label' or 'depth') of every example of a split of the demo's dataset, stacked (N, H, W)."""
    import tensorflow_datasets as tfds

    from vpd_jax.data import pipelines

    builder = pipelines.load_builder(config.data)
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders=tfds.decode.PartialDecoding({feature: True}))
    arrays = np.stack([example[feature] for example in tfds.as_numpy(ds)])
    return arrays[..., 0] if arrays.ndim == 4 else arrays


def seg_baseline(config) -> dict:
    """Scores (mIoU, per-class IoU, ...) of predicting every validation image as the per-pixel majority label of the
    training images: what a model learns from the layout alone (wall above, floor below)."""
    from vpd_jax.data import transforms
    from vpd_jax.data.config import transform_config

    aug = transform_config(config.data)

    def reduced(raw):  # the training labels as the pipeline makes them (reduce_zero_label: 0 -> ignore, k -> k - 1)
        return transforms.reduce_zero_label(raw).numpy() if aug.reduce_zero_label else raw.astype(np.int32)

    num_classes = config.model.num_classes
    train = reduced(split_arrays(config, config.data.split, "label"))
    majority = np.stack([(train == c).sum(axis=0) for c in range(num_classes)]).argmax(axis=0)
    labels = reduced(split_arrays(config, config.data.eval_split, "label"))
    return metrics.segmentation_scores([majority] * len(labels), labels, num_classes)


def depth_baseline(config) -> dict:
    """Depth metrics of predicting every validation image as the per-pixel mean of the training depths."""
    e, m = config.eval, config.model
    train = split_arrays(config, config.data.split, "depth")
    valid = (train > e.min_depth) & (train < m.max_depth)
    mean = np.where(valid, train, 0.0).sum(axis=0) / np.maximum(valid.sum(axis=0), 1)
    gts = split_arrays(config, config.data.eval_split, "depth")
    return metrics.depth_scores([mean] * len(gts), gts, e.min_depth, m.max_depth, crop=e.depth_crop or None)


def per_class(names, **scores) -> dict:
    """{class name: {'trained': IoU, 'untrained': IoU, 'baseline': IoU}} from the IoU lists of each score."""
    return {name: {which: float(s["IoU"][c]) for which, s in scores.items()} for c, name in enumerate(names)}


def seg_panel(predictor, scenes) -> np.ndarray:
    from vpd_jax.apps import predict

    names = predict.class_names(predictor.task.num_classes)
    palette = visualize.class_palette(len(names))
    rows = []
    for scene in scenes:
        outputs = predictor.predict(scene.image)
        labels, maps = outputs["labels"], outputs["attention"]
        truth = scene.label.astype(np.int32) - 1  # reduce_zero_label: 0 ('other', never drawn) -> -1
        cells = [visualize.titled(scene.image, "input"),
                 visualize.titled(visualize.overlay(scene.image, visualize.colorize(truth, palette)), "truth"),
                 visualize.titled(visualize.overlay(scene.image, visualize.colorize(labels, palette)), "prediction")]
        cells += [visualize.titled(visualize.heatmap(maps[..., c], scene.image), f"attn: {names[c]}")
                  for c in range(len(names))]
        rows.append(cells)
    return visualize.side_by_side([visualize.grid(rows), visualize.legend(names, palette)], gap=12)


def depth_panel(predictor, scenes) -> np.ndarray:
    max_depth = predictor.config.model.max_depth
    rows = []
    for scene in scenes:
        pred = predictor.predict(scene.image, scene=scene.scene_class)["depth"]
        cells = [visualize.titled(scene.image, f"input ({scene.room})"),
                 visualize.titled(visualize.colormap(scene.depth, 0.0, max_depth), "truth"),
                 visualize.titled(visualize.colormap(pred, 0.0, max_depth), "prediction"),
                 visualize.titled(visualize.colormap(np.abs(pred - scene.depth), 0.0, max_depth), "|error|")]
        rows.append(cells)
    table = visualize.grid(rows)
    return visualize.side_by_side([table, visualize.colorbar(table.shape[0], 0.0, max_depth, "metres")], gap=12)


TASKS = {"seg": (seg_panel, seg_baseline), "depth": (depth_panel, depth_baseline)}


def run_task(task: str, workdir: str, steps: int | None, panel_images: int, niceness: int = 0) -> dict:
    """Trains (or finds trained) and evaluates one task of the demo, draws its panel: its summary entry."""
    from absl import logging

    from vpd_jax.apps import predict
    from vpd_jax.run import training

    os.nice(niceness)
    # A worker process of `run` has not been through app.run: the console format and level of the main process.
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    launch.quiet_libraries()
    draw, baseline_of = TASKS[task]
    config = demo_config(task, workdir, steps)
    run_dir = os.path.join(workdir, task)
    final = training.train_and_evaluate(config, run_dir)
    with open(os.path.join(run_dir, "eval_0.json")) as f:
        untrained = json.load(f)
    baseline = baseline_of(config)
    predictor = predict.Predictor(config, run_dir)
    panel = visualize.upscale(draw(predictor, validation_scenes(config, panel_images)), 2)
    metric, meaning = HEADLINE[task]
    summary = {
        "metric": metric, "meaning": meaning, "trained": final[metric], "untrained": untrained[metric],
        "baseline": float(baseline[metric]), "baseline_is": BASELINE[task],
        "steps": int(config.total_steps), "metrics": {k: v for k, v in final.items() if isinstance(v, float)},
        "panel": visualize.save_png(os.path.join(workdir, "panels", f"{task}.png"), panel),
        "run": run_dir,
    }
    if task == "seg":
        summary["IoU"] = per_class(predict.class_names(config.model.num_classes), trained=final,
                                   untrained=untrained, baseline=baseline)
    return summary


def run(workdir: str, steps: int | None = None, panel_images: int = 4) -> dict:
    """Both tasks, each in its own process, side by side: XLA compiles a program on one core, so one task's
    compilations overlap the other's training (the results are those of one process after the other). The longer
    run (seg) has the CPU first; depth, niced, takes what seg leaves."""
    import concurrent.futures
    import multiprocessing

    niceness = {"seg": 0, "depth": 10}
    with concurrent.futures.ProcessPoolExecutor(len(TASKS), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {task: pool.submit(run_task, task, workdir, steps, panel_images, niceness[task])
                   for task in TASKS}
        summary = {task: future.result() for task, future in futures.items()}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def report(summary: dict, workdir: str) -> str:
    lines = ["", "VPD demo (tiny SD-shaped model trained from scratch on vpd_shapes; see configs/demo.py)", ""]
    for task, s in summary.items():
        lines.append(f"  {task:5s} {s['metric']} {s['trained']:.4f} after {s['steps']} steps "
                     f"(untrained: {s['untrained']:.4f}; baseline: {s['baseline']:.4f}; {s['meaning']})")
        lines.append(f"        baseline: {s['baseline_is']}")
        if "IoU" in s:
            names = list(s["IoU"])
            lines.append("        IoU        " + " ".join(f"{name:>8s}" for name in names))
            for which in ("trained", "untrained", "baseline"):
                lines.append(f"        {which:10s} " + " ".join(f"{s['IoU'][n][which]:8.4f}" for n in names))
        lines.append(f"        panel {s['panel']}  run {s['run']}")
    lines += ["", f"  summary       {os.path.join(workdir, 'summary.json')}",
              f"  TensorBoard   tensorboard --logdir {workdir}", ""]
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    launch.initialize_distributed()
    workdir = flags.FLAGS.workdir
    summary = run(workdir, flags.FLAGS.steps, flags.FLAGS.panel_images)
    text = report(summary, workdir)
    print(text)


if __name__ == "__main__":
    app.run(main)

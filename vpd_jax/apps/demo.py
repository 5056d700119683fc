"""`make demo`: build vpd_shapes, train VPD segmentation and depth from scratch on the CPU, evaluate, draw.

  python -m vpd_jax.apps.demo --workdir=runs/demo [--steps=N]

Writes under the workdir: seg/ and depth/ (checkpoints, metrics.jsonl, TensorBoard logs, eval_<step>.json),
panels/seg.png and panels/depth.png (input, ground truth, prediction, per-class cross-attention maps / depth
colour maps with a colour bar), and summary.json with the final metrics next to the untrained model's.
A workdir that already holds finished runs is evaluated and drawn again without retraining.
"""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
from absl import app, flags

from vpd_jax import visualize
from vpd_jax.run import launch

flags.DEFINE_string("workdir", "runs/demo", "Where the demo writes everything.")
flags.DEFINE_integer("steps", None, "Training steps per task (default: the demo config's).")
flags.DEFINE_integer("panel_images", 4, "Validation images drawn per task.")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILE = os.path.join(REPO, "configs", "demo.py")
HEADLINE = {"seg": ("mIoU", "higher is better"), "depth": ("rmse", "metres, lower is better")}


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


def run(workdir: str, steps: int | None = None, panel_images: int = 4) -> dict:
    from vpd_jax.apps import predict
    from vpd_jax.run import training

    summary = {}
    for task, draw in (("seg", seg_panel), ("depth", depth_panel)):
        config = demo_config(task, workdir, steps)
        run_dir = os.path.join(workdir, task)
        final = training.train_and_evaluate(config, run_dir)
        with open(os.path.join(run_dir, "eval_0.json")) as f:
            untrained = json.load(f)
        predictor = predict.Predictor(config, run_dir)
        panel = visualize.upscale(draw(predictor, validation_scenes(config, panel_images)), 2)
        metric, meaning = HEADLINE[task]
        summary[task] = {
            "metric": metric, "meaning": meaning, "trained": final[metric], "untrained": untrained[metric],
            "steps": int(config.total_steps), "metrics": {k: v for k, v in final.items() if isinstance(v, float)},
            "panel": visualize.save_png(os.path.join(workdir, "panels", f"{task}.png"), panel),
            "run": run_dir,
        }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def report(summary: dict, workdir: str) -> str:
    lines = ["", "VPD demo (tiny SD-shaped model trained from scratch on vpd_shapes; see configs/demo.py)", ""]
    for task, s in summary.items():
        lines.append(f"  {task:5s} {s['metric']} {s['trained']:.4f} after {s['steps']} steps "
                     f"(untrained: {s['untrained']:.4f}; {s['meaning']})")
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

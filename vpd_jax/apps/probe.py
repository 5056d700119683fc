"""Feature probing of a Stable Diffusion UNet: which blocks and timesteps carry text-aligned semantics (the LD-ZNet
paper's analysis). The 'probe' task (vpd_jax/tasks/probe.py, model in vpd_jax/models/probe.py) trains a small decoder
per (tap, t) on the frozen UNet's features of the noised latent; its PhraseCut metrics (docs/reference.md, "PhraseCut
metrics") on the evaluation split say how much of the phrase's region those features hold. This module turns them into a
table (markdown + JSON) and a heatmap (taps x timesteps) in the workdir:

  python -m vpd_jax.apps.probe --config=configs/probe_sd_features.py:smoke --workdir=runs/probe_smoke

runs train.py's `train_and_evaluate` (sharding, checkpoints, resumption, logs and the evaluation loop are the run
layer's) and then writes the report; `python train.py` with the same config trains without the report.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from vpd_jax import visualize
from vpd_jax.models.probe import probe_name
from vpd_jax.tasks.probe import METRICS


def probe_table(result: dict[str, Any], metric: str) -> tuple[list[str], list[int], np.ndarray]:
    """(taps, timesteps, values (taps, timesteps)) of one metric from an evaluation result."""
    taps, timesteps = list(result["probe_taps"]), [int(t) for t in result["probe_timesteps"]]
    values = np.array([[float(result[f"{probe_name(tap, t)}/{metric}"]) for t in timesteps] for tap in taps])
    return taps, timesteps, values


HEATMAP_CELL = 36  # pixels per (tap, t) cell


def heatmap_image(values: np.ndarray, taps: Sequence[str], timesteps: Sequence[int],
                  cell: int = HEATMAP_CELL) -> tuple[np.ndarray, tuple[int, int]]:
    """A labelled heatmap, taps as rows and timesteps as columns, each cell coloured (viridis, the table's min to
    max) with its value written in, and a colour bar. Returns (picture, (top, left) pixel of the grid)."""
    from PIL import Image, ImageDraw, ImageFont

    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    grid = visualize.colormap(values, low, high).repeat(cell, 0).repeat(cell, 1)
    font = ImageFont.load_default(size=10)
    top, left = 16, 12 + int(max(font.getlength(tap) for tap in taps))
    canvas = Image.new("RGB", (left + grid.shape[1] + 4, top + grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (left, top))
    draw = ImageDraw.Draw(canvas)
    for j, t in enumerate(timesteps):
        draw.text((left + j * cell + 2, 2), f"t={t}", fill="black", font=font)
    for i, tap in enumerate(taps):
        draw.text((4, top + i * cell + cell // 2 - 6), tap, fill="black", font=font)
        for j, value in enumerate(values[i]):
            light = not np.isfinite(value) or value < (low + high) / 2  # dark cell: white text
            draw.text((left + j * cell + 3, top + i * cell + 3), f"{value:.2f}"[:5],
                      fill="white" if light else "black", font=font)
    bar = visualize.colorbar(max(grid.shape[0], 48), low, high)
    return visualize.side_by_side([np.asarray(canvas), bar]), (top, left)


def markdown_table(values: np.ndarray, taps: Sequence[str], timesteps: Sequence[int], metric: str) -> str:
    """Rows = taps, columns = timesteps; the best cell in bold."""
    best = np.unravel_index(np.nanargmax(values), values.shape) if np.isfinite(values).any() else None
    lines = [f"| {metric} | " + " | ".join(f"t={t}" for t in timesteps) + " |",
             "|---|" + "---:|" * len(timesteps)]
    for i, tap in enumerate(taps):
        cells = [f"**{v:.4f}**" if (i, j) == best else f"{v:.4f}" for j, v in enumerate(values[i])]
        lines.append(f"| {tap} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], metric: str, out_dir: str) -> dict[str, str]:
    """probe_table.md, probe_table.json (every metric of every probe) and probe_heatmap.png in out_dir."""
    taps, timesteps, values = probe_table(result, metric)
    os.makedirs(out_dir, exist_ok=True)
    paths = {kind: os.path.join(out_dir, name) for kind, name in
             (("markdown", "probe_table.md"), ("json", "probe_table.json"), ("heatmap", "probe_heatmap.png"))}
    with open(paths["markdown"], "w") as f:
        f.write(f"# Feature probes: {metric} per (tap, timestep)\n\n" + markdown_table(values, taps, timesteps, metric))
    report = {"metric": metric, "taps": taps, "timesteps": timesteps, "table": values.tolist(),
              "all": {tap: {str(t): {name: result[f"{probe_name(tap, t)}/{name}"] for name in METRICS}
                            for t in timesteps} for tap in taps},
              "eval_batches": result.get("eval_batches")}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=2, default=float)
    visualize.save_png(paths["heatmap"], heatmap_image(values, taps, timesteps)[0])
    return paths


# --------------------------------------------------------------------------------------------- entry point


def main(argv):
    from absl import app, flags

    from vpd_jax.run import launch, training

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if launch.printed_config(flags.FLAGS.config):
        return
    launch.initialize_distributed()
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if config.task != "probe":
        raise app.UsageError(f"--config is a {config.task!r} run; vpd_jax.apps.probe runs 'probe' configs "
                             "(configs/probe_sd_features.py)")
    result = training.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
        paths = write_report(result, config.eval.metric, workdir)
        print("probe report: " + ", ".join(paths.values()))


def cli() -> None:
    """`python -m vpd_jax.apps.probe --config=... --workdir=...` (plus train.py's multi-host flags)."""
    from absl import app, flags
    from ml_collections import config_flags

    from vpd_jax.run import launch

    config_flags.DEFINE_config_file("config", None, "A probe config (configs/probe_sd_features.py[:arg]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, logs, eval_<step>.json and the probe report go here.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=launch.parse_flags)


if __name__ == "__main__":
    cli()

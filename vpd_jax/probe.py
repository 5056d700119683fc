"""Feature probing: which UNet blocks and timesteps carry text-aligned semantics (the LD-ZNet paper's analysis).

For every (tap, t) in taps x timesteps, a small decoder is trained on the frozen SD UNet's features of the noised
latent to predict the phrase's mask, and its PhraseCut metrics (spec/ldznet.md 4.1) on the evaluation split say how
much of the phrase's region those features hold. The result is a table (markdown + JSON) and a heatmap (taps x
timesteps) in the workdir:

  python -m vpd_jax.probe --config=configs/probe_sd_features.py:smoke --workdir=runs/probe_smoke

It is the task 'probe' of train.py / eval.py (sharding, checkpoints, resumption, logs and the evaluation loop are
theirs), registered when this module is imported (configs/probe_sd_features.py imports it); the command above runs
train.py's `train_and_evaluate` and then writes the report.

Model (`FeatureProbe`; everything below is our choice, the reference has no probing code):
  z0   = latent_scale x VAE posterior mean (or sample) of the image, frozen;
  c    = CLIP last_hidden_state of the phrase (in the pipeline's prompt template), frozen;
  per example one noise draw eps, used at every timestep (the timesteps differ only in t);
  z_t  = q_sample(z0, t, eps) for all t at once: one batched UNet call returns every tap, under stop_gradient,
         and stops after the block of the last tap (`output_sample=False`);
  per (tap, t) a decoder: LayerNorm over channels (taps differ in scale) -> 1x1 conv -> SiLU -> 3x3 conv -> SiLU
  -> 1x1 conv to one logit, bilinearly upsampled to the image (PyTorch semantics).
Loss: the mean over probes of each probe's BCE-with-logits at full resolution. The decoders share no parameters,
so each gets the gradient of its own BCE (divided by the probe count, to which Adam is invariant): they train
exactly as if trained one by one on the same batches. Gradient clipping (global) would couple them: keep it off.

The frozen UNet's parameter tree is the whole SD UNet but its output head (init traces the full UNet), so any SD
checkpoint in `config.init` loads through the trainer's strict pretrained-weight path; the forward only runs up to
the last tap.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vpd_jax import metrics, tasks, visualize
from vpd_jax.ldznet_task import example_keys
from vpd_jax.models import resize
from vpd_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from vpd_jax.models.layers import Conv, LayerNorm
from vpd_jax.models.ldznet import LATENT_SCALE, NoiseSchedule, q_sample
from vpd_jax.models.presets import Architecture
from vpd_jax.models.unet import UNet2DConditionModel
from vpd_jax.models.unet_config import UNetConfig
from vpd_jax.models.vae import AutoencoderKLEncoder, VAEConfig

Dtype = Any
Batch = dict[str, Any]
METRICS = ("mIoU@0.3", "IoU_FG@0.3", "IoU_FG@0.5", "AP")
OUTPUT_HEAD = ("conv_norm_out", "conv_act", "conv_out")


def default_taps(config: UNetConfig) -> tuple[str, ...]:
    """The last transformer of every cross-attention block, encoder to decoder (7 for SD v1 / v2: one per
    resolution of the encoder, the middle, one per resolution of the decoder)."""
    taps = [f"down_blocks.{i}.attentions.{config.layers_per_block[i] - 1}"
            for i, kind in enumerate(config.down_block_types) if kind == "CrossAttnDownBlock2D"]
    taps.append("mid_block.attentions.0")
    taps += [f"up_blocks.{i}.attentions.{config.up_layers_per_block[i] - 1}"
             for i, kind in enumerate(config.up_block_types) if kind == "CrossAttnUpBlock2D"]
    return tuple(taps)


def probe_name(tap: str, t: int) -> str:
    """The key of one probe in parameter trees and metric names."""
    return f"{tap}/t={t}"


def decoder_name(tap: str, t: int) -> str:
    """The parameter subtree of one probe's decoder (no dots: checkpoint keys join names with dots)."""
    return f"decoder_{tap.replace('.', '_')}_t{t}"


class ProbeDecoder(nn.Module):
    """Features (B, h, w, C) -> logits (B, H, W, 1) at the image size `size`."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, size: tuple[int, int]) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = LayerNorm(name="norm", **kw)(features)
        x = nn.silu(Conv(self.channels, 1, name="conv_in", **kw)(x))
        x = nn.silu(Conv(self.channels, 3, padding=1, name="conv_mid", **kw)(x))
        x = Conv(1, 1, name="conv_out", **kw)(x)
        return resize.bilinear(x.astype(jnp.float32), size)


class FeatureProbe(nn.Module):
    """Call: (images (B, H, W, 3) in [-1, 1], token_ids (B, L), keys (B,) PRNG keys) -> logits (B, H, W, P), one
    channel per probe in the order of `probes` (tap-major: all timesteps of the first tap, then the next tap)."""

    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig
    taps: tuple[str, ...]
    timesteps: tuple[int, ...]
    decoder_channels: int = 64
    latent_scale: float = LATENT_SCALE
    sample_latent: bool = False
    schedule: NoiseSchedule = NoiseSchedule()
    remat_policy: str | None = None
    attention_query_chunk: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def probes(self) -> tuple[tuple[str, int], ...]:
        return tuple((tap, t) for tap in self.taps for t in self.timesteps)

    def check(self) -> None:
        if not self.taps or not self.timesteps:
            raise ValueError(f"the probe needs taps and timesteps, got taps={self.taps}, timesteps={self.timesteps}")
        if len(set(self.taps)) != len(self.taps) or len(set(self.timesteps)) != len(self.timesteps):
            raise ValueError(f"repeated taps or timesteps: {self.taps}, {self.timesteps}")
        bad = [t for t in self.timesteps if not 0 <= t < self.schedule.num_train_timesteps]
        if bad:
            raise ValueError(f"timesteps {bad} are outside [0, {self.schedule.num_train_timesteps})")
        if self.text.hidden_size != self.unet.cross_attention_dim:
            raise ValueError(f"the text encoder's width {self.text.hidden_size} differs from the UNet's "
                             f"cross_attention_dim {self.unet.cross_attention_dim}")

    @nn.compact
    def __call__(self, images: jax.Array, token_ids: jax.Array, keys: jax.Array) -> jax.Array:
        self.check()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, size = images.shape[0], tuple(images.shape[1:3])
        split = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
        vae_keys, noise_keys = split[:, 0], split[:, 1]

        posterior = AutoencoderKLEncoder(self.vae, name="vae", **kw)(images)
        latent = posterior.mean
        if self.sample_latent:
            noise = jax.vmap(lambda k: jax.random.normal(k, latent.shape[1:], jnp.float32))(vae_keys)
            latent = latent + posterior.std * noise.astype(latent.dtype)
        z0 = jax.lax.stop_gradient(latent.astype(jnp.float32)) * self.latent_scale
        context = CLIPTextModel(self.text, name="text_encoder", **kw)(token_ids).last_hidden_state
        context = jax.lax.stop_gradient(context)

        count = len(self.timesteps)
        eps = jax.vmap(lambda k: jax.random.normal(k, z0.shape[1:], jnp.float32))(noise_keys)
        ts = jnp.repeat(jnp.asarray(self.timesteps, jnp.int32), batch)  # (T * B,), timestep-major
        z_t = q_sample(self.schedule, jnp.tile(z0, (count, 1, 1, 1)), ts, jnp.tile(eps, (count, 1, 1, 1)))
        unet = UNet2DConditionModel(self.unet, remat_policy=self.remat_policy,
                                    attention_query_chunk=self.attention_query_chunk, name="unet", **kw)
        taps = self.taps
        if self.is_initializing():
            # Create the whole UNet but its output head, so that SD checkpoints load strictly (module docstring).
            taps = tuple(dict.fromkeys(taps + (f"up_blocks.{len(self.unet.up_block_types) - 1}",)))
        out = unet(z_t, ts, jnp.tile(context, (count, 1, 1)), taps=taps, output_sample=False)
        features = {tap: jax.lax.stop_gradient(f).reshape(count, batch, *f.shape[1:]) for tap, f in out.taps.items()}

        logits = [ProbeDecoder(self.decoder_channels, name=decoder_name(tap, t), **kw)(
            features[tap][self.timesteps.index(t)], size) for tap, t in self.probes]
        return jnp.concatenate(logits, axis=-1)


def model_from_config(m: ml_collections.ConfigDict, arch: Architecture) -> FeatureProbe:
    if m.dtype not in tasks.DTYPES:
        raise ValueError(f"config.model.dtype={m.dtype!r}; supported: {sorted(tasks.DTYPES)}")
    valid, _ = arch.unet.module_names()
    taps = tuple(m.taps) or default_taps(arch.unet)
    unknown = [tap for tap in taps if tap not in valid]
    if unknown:
        raise ValueError(f"config.model.taps {unknown} are not modules of this UNet; valid names:\n  "
                         + "\n  ".join(valid))
    head = [tap for tap in taps if tap in OUTPUT_HEAD]
    if head:
        raise ValueError(f"config.model.taps {head}: the UNet's output head is not probed (its weights are not "
                         "part of the frozen tree that SD checkpoints fill)")
    model = FeatureProbe(unet=arch.unet, vae=arch.vae, text=arch.text, taps=taps,
                         timesteps=tuple(int(t) for t in m.timesteps), decoder_channels=m.decoder_channels,
                         latent_scale=m.latent_scale, sample_latent=m.sample_latent,
                         **tasks.compute_kwargs(m))
    model.check()
    return model


# ------------------------------------------------------------------------------------------------ the task


@dataclasses.dataclass
class ProbeMetric:
    """One PhraseCutMetric per probe; `result()` gives '<tap>/t=<t>/<metric>' for every probe, and the layout."""

    probes: tuple[tuple[str, int], ...]
    taps: tuple[str, ...]
    timesteps: tuple[int, ...]

    def __post_init__(self):
        self.metrics = [metrics.PhraseCutMetric() for _ in self.probes]

    def update(self, statistics) -> None:
        counts, valid = statistics
        for metric, probe_counts in zip(self.metrics, counts):
            metric.update(probe_counts, valid)

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"probe_taps": list(self.taps), "probe_timesteps": list(self.timesteps)}
        for (tap, t), metric in zip(self.probes, self.metrics):
            out.update({f"{probe_name(tap, t)}/{name}": value for name, value in metric.result().items()})
        return out


class ProbeTask(tasks.Task):
    """'probe' for train.py / eval.py: batches of the 'phrasecut' pipeline (image, mask, tokens)."""

    name = "probe"
    frozen_subtrees = ("vae", "text_encoder", "unet")

    def __init__(self, config: ml_collections.ConfigDict, arch: Architecture):
        m = config.model
        if m.arch == "init":  # the text tower of the checkpoint (CLIP-L for SD v1, OpenCLIP-H for SD v2)
            from vpd_jax.weights import load_text_encoder

            text, _ = load_text_encoder(m.text_encoder or config.init, on_host=True)
            arch = dataclasses.replace(arch, text=text.config)
        super().__init__(config, arch)
        if config.data.task != "phrasecut":
            raise ValueError(f"the probe trains on phrase masks: config.data.task must be 'phrasecut', got "
                             f"{config.data.task!r}")
        if config.eval.metric not in METRICS:
            raise ValueError(f"config.eval.metric={config.eval.metric!r}; one of {METRICS}")
        self.model = model_from_config(m, arch)
        self.tokenizer = tasks.text_tokenizer(config, arch)
        self.constants = {}

    def model_args(self, batch: Batch, constants: dict) -> tuple:
        return batch["image"], batch["tokens"]

    def _keys(self, batch: Batch, train: bool, rng) -> jax.Array:
        if not train:
            return example_keys(self.config.eval.seed, batch)  # reproducible, per example
        if rng is None:
            raise ValueError("probe training draws the noise of the noisy latents: pass rng")
        return jax.random.split(rng, batch["image"].shape[0])

    def init_variables(self, rng: jax.Array, batch: Batch, constants: dict) -> dict:
        params_rng, noise_rng = jax.random.split(rng)
        return self.model.init(params_rng, *self.model_args(batch, constants), self._keys(batch, True, noise_rng))

    def apply(self, variables: dict, batch: Batch, constants: dict, *, train: bool, rng: jax.Array | None = None):
        keys = self._keys(batch, train, rng)
        return self.model.apply({"params": variables["params"]}, *self.model_args(batch, constants), keys), None

    def loss(self, output: jax.Array, batch: Batch) -> jax.Array:
        mask = batch["mask"].astype(output.dtype)
        if output.shape[:3] != mask.shape[:3]:
            raise ValueError(f"logits {output.shape} and mask {mask.shape} differ in size")
        return optax.sigmoid_binary_cross_entropy(output, jnp.broadcast_to(mask, output.shape)).mean()

    def eval_statistics(self, variables: dict, batch: Batch, constants: dict) -> Any:
        logits, _ = self.apply(variables, batch, constants, train=False)
        probs = jax.nn.sigmoid(logits)
        counts = [metrics.phrasecut_counts(probs[..., p], batch["mask"][..., 0], example_mask=batch["valid"])[0]
                  for p in range(logits.shape[-1])]
        return jnp.stack(counts), batch["valid"]

    def new_metric(self) -> ProbeMetric:
        return ProbeMetric(self.model.probes, self.model.taps, self.model.timesteps)


tasks.TASKS[ProbeTask.name] = ProbeTask


# ---------------------------------------------------------------------------------------------- the report


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

    from vpd_jax import launch, train_lib

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    launch.initialize_distributed()
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if config.task != ProbeTask.name:
        raise app.UsageError(f"--config is a {config.task!r} run; vpd_jax.probe runs 'probe' configs "
                             "(configs/probe_sd_features.py)")
    result = train_lib.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
        paths = write_report(result, config.eval.metric, workdir)
        print("probe report: " + ", ".join(paths.values()))


def cli() -> None:
    """`python -m vpd_jax.probe --config=... --workdir=...` (plus train.py's multi-host flags)."""
    from absl import app, flags
    from ml_collections import config_flags

    from vpd_jax import launch

    config_flags.DEFINE_config_file("config", None, "A probe config (configs/probe_sd_features.py[:arg]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, logs, eval_<step>.json and the probe report go here.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=launch.parse_flags)


if __name__ == "__main__":
    from vpd_jax.probe import cli as _cli  # the importable module, which the config file registers the task from

    _cli()

"""Feature probing of a Stable Diffusion UNet: a small decoder per (tap, timestep) trained on the frozen UNet's
features of noised latents to segment the phrase's region, one PhraseCut metric per (tap, t) as a table and a
heatmap (the LD-ZNet paper's analysis of which blocks and timesteps carry text-aligned semantics; vpd_jax/probe.py
describes the model). The reference repository has no probing code (spec/ldznet.md): every value here is our choice,
and the paper's figure is a qualitative comparison, not a number this run reproduces.

  python -m vpd_jax.probe --config=configs/probe_sd_features.py --workdir=runs/probe_sd14 \\
      --config.init=/path/to/stable-diffusion-v1-4 \\
      --config.data.data_dir=/path/to/tfds --config.data.manual_dir=/path/to/VGPhraseCut_v0
  python -m vpd_jax.probe --config=configs/probe_sd_features.py:smoke --workdir=runs/probe_smoke

writes probe_table.md, probe_table.json and probe_heatmap.png to the workdir after training and evaluating. The same
run without the report is `python train.py --config=configs/probe_sd_features.py[:smoke] --workdir=...`
(eval_<step>.json then holds every probe's metrics; eval.py re-evaluates a checkpoint).

  Arguments: (none) any SD v1.x / v2.x checkpoint in config.init (a diffusers pipeline root or a CompVis file with
  --config.model.text_encoder / tokenizer folders) on PhraseCut: 384 px, global batch 16, 3,000 steps (48k phrase
  examples, about half an epoch of PhraseCut train), evaluated on 2,000 examples of the validation split; the 7 taps of
  `probe.default_taps` (the last transformer of every cross-attention block) x 10 timesteps 0, 100, ..., 900 (70
  probes; each step runs the UNet on 10 x 16 latents). 'smoke' a tiny random UNet on vpd_shapes phrases with the
  hash tokenizer: 3 taps x 2 timesteps, a CPU finishes it in a couple of minutes.

Model fields (config.model): arch ('init' or a preset), text_encoder / tokenizer (default: the `init` pipeline's;
tokenizer 'hash' for CLIP-less runs), taps (() = probe.default_taps of the UNet; any name of
UNetConfig.module_names but the output head), timesteps, decoder_channels, latent_scale, sample_latent (False: the
posterior mean), remat_policy, attention_query_chunk, dtype. config.eval: seed (per-example noise at evaluation), metric (the table's:
mIoU@0.3, IoU_FG@0.3, IoU_FG@0.5 or AP; the JSON has all four). The optimizer trains only the decoders: Adam lr 1e-3,
no weight decay, constant lr, no EMA, no gradient clipping (it would couple the probes).
"""
import ml_collections

from vpd_jax import probe  # noqa: F401  (registers the 'probe' task for train.py / eval.py)
from vpd_jax.config_base import base_config
from vpd_jax.data.config import data_config
from vpd_jax.optim import default_optim_config

ARGS = ("", "smoke")  # every argument get_config accepts ('' = none)


def get_config(arg=None):
    if arg == "smoke":
        return smoke_config()
    if arg:
        raise ValueError(f"unknown config argument {arg!r}; use one of {ARGS}")
    c = probe_config("phrasecut", batch_size=16)
    c.total_steps = 3000
    c.ckpt_every = 500
    c.eval_max_batches = 125  # 2,000 validation examples (each is 10 UNet passes)
    return c


def probe_config(data_name: str, batch_size: int) -> ml_collections.ConfigDict:
    # The run-level fields are config_base's; the task-specific sections are replaced (as configs/ldznet_phrasecut.py).
    c = base_config("refer", data_name)
    c.task = "probe"
    c.model = ml_collections.ConfigDict(dict(
        arch="init", text_encoder="", tokenizer="",
        taps=(), timesteps=tuple(range(0, 1000, 100)), decoder_channels=64,
        latent_scale=0.18215, sample_latent=False,
        remat_policy="", attention_query_chunk=0, dtype="float32",
        class_embeddings="",  # unused; train_lib.check_config checks this path for every task
    ))
    c.data = data_config("phrasecut", data_name)
    c.data.eval_split = "validation"  # an analysis, not a test-set number
    c.batch_size = batch_size
    c.eval_batch_size = batch_size
    c.optim = default_optim_config("ldznet", global_batch=batch_size)
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.0
    c.optim.ema_decay = 0.0
    c.optim.param_groups = [dict(pattern=r"^(vae|text_encoder|unet)/", frozen=True)]
    c.eval = ml_collections.ConfigDict(dict(seed=0, metric="mIoU@0.3"))
    c.log_every = 50
    return c


def smoke_config():
    c = probe_config("vpd_shapes/small", batch_size=8)
    c.model.arch = "tiny"
    c.model.tokenizer = "hash"
    c.model.taps = ("down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.3.attentions.1")
    c.model.timesteps = (100, 500)
    c.model.decoder_channels = 16
    c.optim.lr = 3e-3
    c.eval_batch_size = 16
    c.total_steps = 40
    c.log_every = 10
    c.ckpt_every = 20
    c.eval_max_batches = 2
    return c

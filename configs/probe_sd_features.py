"""Feature probing of a Stable Diffusion UNet: a small decoder per (tap, timestep) trained on the frozen UNet's
features of noised latents to segment the phrase's region, one PhraseCut metric per (tap, t) as a table and a
heatmap (the LD-ZNet paper's analysis of which blocks and timesteps carry text-aligned semantics;
vpd_jax/models/probe.py describes the model). The LD-ZNet repository has no probing code: every value here is our
choice, and the paper's figure is a qualitative comparison, not a number this run reproduces.

  python -m vpd_jax.apps.probe --config=configs/probe_sd_features.py --workdir=runs/probe_sd14 \\
      --config.init=/path/to/stable-diffusion-v1-4 \\
      --config.data.data_dir=/path/to/tfds --config.data.manual_dir=/path/to/VGPhraseCut_v0
  python -m vpd_jax.apps.probe --config=configs/probe_sd_features.py:smoke --workdir=runs/probe_smoke

writes probe_table.md, probe_table.json and probe_heatmap.png to the workdir after training and evaluating. The same
run without the report is `python train.py --config=configs/probe_sd_features.py[:smoke] --workdir=...`
(eval_<step>.json then holds every probe's metrics; eval.py re-evaluates a checkpoint).

  Arguments: (none) any SD v1.x / v2.x checkpoint in config.init (a diffusers pipeline root or a CompVis file with
  --config.model.text_encoder / tokenizer folders) on PhraseCut: 384 px, global batch 16, 3,000 steps (48k phrase
  examples, about half an epoch of PhraseCut train), evaluated on 2,000 examples of the validation split; the paper's
  probes: the 16 spatial transformers of `vpd_jax.models.probe.default_taps` x 10 timesteps 0, 100, ..., 900 (160
  probes; each step runs the UNet on 10 x 16 latents). 'smoke' a tiny random UNet on vpd_shapes phrases with the
  hash tokenizer: 3 taps x 2 timesteps, a CPU finishes it in a couple of minutes.

Model and eval fields (config.model, config.eval): vpd_jax/tasks/probe.py, `ProbeTask.model_config` / `eval_config`.
The optimizer (preset 'probe') trains only the decoders: Adam lr 1e-3, no weight decay, constant lr, no EMA, no
gradient clipping (it would couple the probes).
"""
from configs.common import check_arg, cpu_run, scratch_tiny
from vpd_jax.run.config import base_config

ARGS = ("", "smoke")  # every argument get_config accepts ('' = none)


def get_config(arg=None):
    if check_arg(arg, ARGS) == "smoke":
        return smoke_config()
    c = probe_config("phrasecut", batch_size=16)
    c.total_steps = 3000
    c.ckpt_every = 500
    c.eval_max_batches = 125  # 2,000 validation examples (each is 10 UNet passes)
    return c


def probe_config(data_name: str, batch_size: int):
    c = base_config("probe", data_name)
    c.data.eval_split = "validation"  # an analysis, not a test-set number
    c.batch_size = batch_size
    c.eval_batch_size = batch_size
    return c


def smoke_config():
    c = probe_config("vpd_shapes/small", batch_size=8)
    scratch_tiny(c)
    c.model.taps = ("down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.3.attentions.1")
    c.model.timesteps = (100, 500)
    c.model.decoder_channels = 16
    c.optim.lr = 3e-3
    cpu_run(c, batch_size=8, eval_batch_size=16, total_steps=40, log_every=10, ckpt_every=20)
    return c

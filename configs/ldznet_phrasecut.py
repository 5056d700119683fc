"""LD-ZNet (default) or ZNet (--config.model.inject=False): text-based segmentation on PhraseCut (spec/ldznet.md;
the paper's PhraseCut test table reports mIoU / IoU_FG / AP, here mIoU@0.3, IoU_FG@0.3, IoU_FG@0.5 and AP, spec 4.1;
the spec does not record the paper's numbers: check the paper before comparing).

Reference run (spec 0, 3.2): SD v1.4 (`config.init`: a diffusers folder or sd-v1-4-full-ema.ckpt; its non-EMA UNet
initialises ZNet with conv_out sliced to channel 0 and is the frozen feature extractor), CLIP ViT-L/14, 384x384
square crops, batch 4 per GPU (the GPU count is not recorded; we take 8, i.e. global batch 32), AdamW
(0.9, 0.999, 1e-8) wd 0.01 on everything trained, lr = 5e-7 x global batch (1.6e-5 at 32; it follows
--config.batch_size unless --config.optim.lr is given), EMA 0.9999 used for evaluation. Documented replacements:
  - ReduceLROnPlateau(0.5, patience 1) on the epoch-mean training loss -> a constant lr (vpd_jax.optim explains);
  - the training length is not recorded ("until stopped"): 100k steps at batch 32 (about 10 epochs of PhraseCut
    train) is our choice;
  - evaluation is deterministic: the prompt template is seeded per example (data.seed) and the VAE sample, SD
    timestep and noise per example (eval.seed), where the reference draws them at random (spec 7.15).
Test protocol (spec 4.1): the `test` split, whole image squashed to 384x384, metrics at 384x384.

  python train.py --config=configs/ldznet_phrasecut.py --workdir=runs/ldznet_phrasecut \\
      --config.init=/path/to/stable-diffusion-v1-4 \\
      --config.data.data_dir=/path/to/tfds --config.data.manual_dir=/path/to/VGPhraseCut_v0
  python eval.py --config=configs/ldznet_phrasecut.py --workdir=runs/ldznet_phrasecut --config.init=...

  Arguments: (none) the reference run; 'smoke' a tiny scratch run on vpd_shapes phrases that a CPU finishes in
  minutes (tiny SD-shaped architecture, hash tokenizer, no pretrained weights).

Model fields (config.model): arch ('init': UNet/VAE from config.init, CLIP-L text encoder; or a preset),
text_encoder / tokenizer (default: the `init` pipeline's; tokenizer 'hash' for CLIP-less runs), inject (False:
ZNet), sites (() = the five SD v1 blocks of spec 2.3), pool_image_size (the pools' learned grid is sized for this
image side, 384 -> 12x12 / 6x6), latent_scale, sample_latent, sd_timesteps / sd_timestep_mode ('uniform' (low,
high) per example, or 'mean' over listed t's), head_init ('pytorch' as the reference; 'upsample' starts the
1-channel 8x head as a nearest upsampler, for runs without SD weights), remat_policy, attention_query_chunk, dtype.
"""
import ml_collections

from vpd_jax.config_base import base_config
from vpd_jax.data.config import data_config
from vpd_jax.optim import LDZNET_LR_PER_SAMPLE, default_optim_config


def get_config(arg=None):
    if arg == "smoke":
        return smoke_config()
    if arg:
        raise ValueError(f"unknown config argument {arg!r}; use none or 'smoke'")
    c = ldznet_config("phrasecut", batch_size=32)
    c.eval_batch_size = 32  # the CLIPSeg scorer's batch (spec 4.1)
    c.total_steps = 100_000
    c.ckpt_every = 500  # the reference's checkpoint interval (spec 3.2)
    c.eval_every = 10_000
    return c


def ldznet_config(data_name: str, batch_size: int) -> ml_collections.ConfigDict:
    # The run-level fields (seed, init, resume, mesh, sharding rules, logging, checkpoints, nonfinite) are
    # config_base's; the task-specific sections are replaced.
    c = base_config("refer", data_name)
    c.task = "ldznet"
    c.model = ml_collections.ConfigDict(dict(
        arch="init", text_encoder="", tokenizer="",
        inject=True, sites=(), pool_image_size=384,
        latent_scale=0.18215, sample_latent=True,  # spec 0, 7.12
        sd_timesteps=(300, 500), sd_timestep_mode="uniform",  # spec 2.2, 7.4
        head_init="pytorch",  # spec 1.2; 'upsample' for runs from scratch (vpd_jax/models/ldznet.py UpsampleHead)
        remat_policy="", attention_query_chunk=0, dtype="float32",
        class_embeddings="",  # unused by LD-ZNet; train_lib.check_config checks this path for every task
    ))
    c.data = data_config("phrasecut", data_name)
    c.batch_size = batch_size
    c.eval_batch_size = c.data.eval_batch_size_per_host
    c.optim = default_optim_config("ldznet", global_batch=batch_size)
    c.optim.lr = c.get_ref("batch_size").to_float() * LDZNET_LR_PER_SAMPLE  # spec 3.2: scaled with the batch
    c.eval = ml_collections.ConfigDict(dict(seed=0))
    return c


def smoke_config():
    c = ldznet_config("vpd_shapes/small", batch_size=8)
    c.model.arch = "tiny"
    c.model.tokenizer = "hash"
    c.model.pool_image_size = c.data.aug.size  # 64: the pools' grids match the smoke images
    c.model.head_init = "upsample"  # no SD conv_out to start from: the 1-channel head starts as an upsampler
    c.optim.lr = 1e-3  # a scratch run of a tiny network, not the pretrained reference's 5e-7 per sample
    c.optim.ema_warmup = True  # decay min(0.9999, (1 + n) / (10 + n)): the EMA follows a run this short
    c.eval_batch_size = 16
    c.total_steps = 60
    c.log_every = 10
    c.ckpt_every = 30
    c.eval_max_batches = 2
    return c

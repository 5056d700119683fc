"""LD-ZNet (default) or ZNet (--config.model.inject=False): text-based segmentation on PhraseCut (docs/reference.md,
"LD-ZNet"; the paper's PhraseCut test table reports mIoU / IoU_FG / AP, here mIoU@0.3, IoU_FG@0.3, IoU_FG@0.5 and AP,
docs/reference.md "PhraseCut metrics"; this repository does not record the paper's numbers: check the paper before
comparing).

Reference run (docs/reference.md, "LD-ZNet at a glance", "LD-ZNet optimiser and learning rate"): SD v1.4 (`config.init`:
sd-v1-4-full-ema.ckpt, whose non-EMA UNet, as the reference's, initialises ZNet with conv_out sliced to channel 0 and is
the frozen feature extractor (`model.compvis_unet`); a diffusers folder gives the UNet it was exported with;
docs/fidelity.md), CLIP ViT-L/14, 384x384 square crops, batch 4 per GPU (the GPU count is not recorded; we take 8, i.e.
global batch 32), AdamW (0.9, 0.999, 1e-8) wd 0.01 on everything trained, lr = 5e-7 x global batch (1.6e-5 at 32; it
follows --config.batch_size unless --config.optim.lr is given), EMA 0.9999 used for evaluation. Documented replacements:
  - ReduceLROnPlateau(0.5, patience 1) on the epoch-mean training loss -> a constant lr (vpd_jax.run.optim explains);
  - the training length is not recorded ("until stopped"): 100k steps at batch 32 (about 10 epochs of PhraseCut
    train) is our choice;
  - evaluation is deterministic: the prompt template is seeded per example (data.seed) and the VAE sample, SD timestep
    and noise per example (eval.seed), where the reference draws them at random (docs/reference.md, "PhraseCut test
    protocol"; docs/fidelity.md).
Test protocol (docs/reference.md, "PhraseCut test protocol"): the `test` split, whole image squashed to 384x384, metrics
at 384x384.

  python train.py --config=configs/ldznet_phrasecut.py --workdir=runs/ldznet_phrasecut \\
      --config.init=/path/to/stable-diffusion-v1-4 \\
      --config.data.data_dir=/path/to/tfds --config.data.manual_dir=/path/to/VGPhraseCut_v0
  python eval.py --config=configs/ldznet_phrasecut.py --workdir=runs/ldznet_phrasecut --config.init=...

  Arguments: (none) the reference run; 'smoke' a tiny scratch run on vpd_shapes phrases that a CPU finishes in
  minutes (tiny SD-shaped architecture, hash tokenizer, no pretrained weights).

Model fields (config.model): vpd_jax/tasks/ldznet.py, `LDZNetTask.model_config`.
"""
from configs.common import check_arg, cpu_run, scratch_tiny
from vpd_jax.run.config import base_config
from vpd_jax.run.optim import LDZNET_LR_PER_SAMPLE, default_optim_config

ARGS = ("", "smoke")  # every argument get_config accepts ('' = none)


def get_config(arg=None):
    if check_arg(arg, ARGS) == "smoke":
        return smoke_config()
    c = ldznet_config("phrasecut", batch_size=32)
    c.compute.matmul_precision = "highest"  # float32 matmuls as the references' fp32 GPU runs (README)
    c.eval_batch_size = 32  # the CLIPSeg scorer's batch
    c.total_steps = 100_000
    c.ckpt_every = 500  # the reference's checkpoint interval
    c.eval_every = 10_000
    return c


def ldznet_config(data_name: str, batch_size: int):
    c = base_config("ldznet", data_name)
    c.batch_size = batch_size
    c.eval_batch_size = c.data.eval_batch_size_per_host
    c.optim = default_optim_config("ldznet", global_batch=batch_size)
    c.optim.lr = c.get_ref("batch_size").to_float() * LDZNET_LR_PER_SAMPLE  # scaled with the batch, as the reference
    return c


def smoke_config():
    c = ldznet_config("vpd_shapes/small", batch_size=8)
    scratch_tiny(c)
    c.model.pool_image_size = c.data.aug.size  # 64: the pools' grids match the smoke images
    c.model.head_init = "upsample"  # no SD conv_out to start from: the 1-channel head starts as an upsampler
    c.optim.lr = 1e-3  # a scratch run of a tiny network, not the pretrained reference's 5e-7 per sample
    c.optim.ema_warmup = True  # decay min(0.9999, (1 + n) / (10 + n)): the EMA follows a run this short
    cpu_run(c, batch_size=8, eval_batch_size=16, total_steps=60, log_every=10, ckpt_every=30)
    return c

"""VPD semantic segmentation on ADE20K-150 (paper: 53.7 mIoU single scale, 54.6 ms+flip). The original recipe and
test protocol: docs/reference.md, "Segmentation model and loss" to "Segmentation test protocol".

Reference run: SD v1.5, Semantic FPN, 512x512 crops, global batch 16 (8 GPUs x 2), 80k iterations, AdamW 8e-5
(UNet x0.1 except its transformer norms), wd 1e-3, poly(1.0) with 1500 warm-up iterations; slide test 512/341.

  python train.py --config=configs/vpd_seg_ade20k.py --workdir=runs/seg_ade20k \\
      --config.init=/path/to/stable-diffusion-v1-5 \\
      --config.model.class_embeddings=/path/to/ade20k_class_embeddings.pth \\
      --config.data.data_dir=/path/to/tfds --config.data.manual_dir=/path/to/ADEChallengeData2016.zip

  python eval.py --config=configs/vpd_seg_ade20k.py:aug --workdir=runs/seg_ade20k ...   (the 54.6 protocol)

  Arguments: (none) the paper run, evaluated single scale (53.7); 'aug' the same run evaluated as mmseg's
  --aug-test (image ratios 1.0-1.5, each also flipped, softmax averaged: 54.6); 'smoke' a tiny scratch run on
  vpd_shapes that a CPU finishes in minutes.
"""
from configs.common import check_arg, cpu_run, scratch_tiny, shapes_seg
from vpd_jax.inference import AUG_TEST_RATIOS
from vpd_jax.run.config import base_config

ARGS = ("", "aug", "smoke")  # every argument get_config accepts ('' = none)


def get_config(arg=None):
    arg = check_arg(arg, ARGS)
    if arg == "smoke":
        return smoke_config()
    c = base_config("seg", "ade20k")
    if arg == "aug":
        c.eval.seg_ratios = AUG_TEST_RATIOS
        c.eval.flip = True
    c.compute.matmul_precision = "highest"  # float32 matmuls as the references' fp32 GPU runs (README)
    c.batch_size = 16
    c.eval_batch_size = 8
    c.total_steps = 80_000
    c.eval_every = c.ckpt_every = 8_000
    return c


def smoke_config():
    c = base_config("seg", "vpd_shapes/small")
    scratch_tiny(c)
    shapes_seg(c)
    cpu_run(c, batch_size=4, eval_batch_size=8, total_steps=4, log_every=2, ckpt_every=2)
    c.optim.schedule.warmup_steps = 2
    return c

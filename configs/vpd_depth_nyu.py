"""VPD monocular depth on NYUv2 (paper: RMSE 0.254, d1 0.964, REL 0.069 on the 654 test images). The original
recipe and test protocol: docs/reference.md, "Depth model" to "Depth test protocol".

Reference run: SD v1.5, 480x480 crops of the 24,231-image BTS training set (padded to 512 in the model), global
batch 24 (8 GPUs x 3), 25 epochs of 1,009 iterations, AdamW with the power-0.9 ramp 3e-5 -> 5e-4 -> 3e-5 (UNet
x0.01), wd 0.1; test with two shifted 480 windows + flip, Eigen crop, per-image metrics.

  python train.py --config=configs/vpd_depth_nyu.py --workdir=runs/depth_nyu \\
      --config.init=/path/to/stable-diffusion-v1-5 \\
      --config.model.class_embeddings=/path/to/nyu_class_embeddings.pth \\
      --config.data.data_dir=/path/to/tfds --config.data.manual_dir=/path/to/nyu_bts

  Arguments: (none) the paper run; 'smoke' a tiny scratch run on vpd_shapes.
"""
from configs.common import check_arg, cpu_run, scratch_tiny, shapes_depth
from vpd_jax.run.config import base_config

ARGS = ("", "smoke")  # every argument get_config accepts ('' = none)


def get_config(arg=None):
    if check_arg(arg, ARGS) == "smoke":
        return smoke_config()
    c = base_config("depth", "nyu_depth_v2_bts")
    c.compute.matmul_precision = "highest"  # float32 matmuls as the references' fp32 GPU runs (README)
    c.batch_size = 24
    c.eval_batch_size = 8
    c.steps_per_epoch = 1009  # 24,231 images / 24, as DistributedSampler gives (3,029 per rank / 3)
    c.total_steps = 25 * c.steps_per_epoch
    c.eval_every = c.ckpt_every = c.steps_per_epoch
    c.eval.depth_window = 480
    return c


def smoke_config():
    c = base_config("depth", "vpd_shapes/small")
    scratch_tiny(c)  # random embeddings of the 27 NYU scene classes (vpd_shapes rooms are NYU scene names)
    shapes_depth(c)
    cpu_run(c, batch_size=4, eval_batch_size=8, total_steps=4, log_every=2, ckpt_every=2)
    c.steps_per_epoch = 2
    return c

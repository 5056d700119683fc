"""The demo (`make demo`): VPD segmentation and depth trained from scratch on vpd_shapes on a CPU.

No pretrained Stable Diffusion weights can be downloaded offline, so the demo uses the 'tiny' SD-shaped
architecture with random initialisation, random class embeddings and the whole UNet at the head's learning
rate (a scratch run, not the paper's fine-tuning recipe). It shows the full path — data, sharded training,
checkpoints, evaluation, pictures — in a few minutes; its numbers say nothing about the paper's.

  python -m vpd_jax.demo --workdir=runs/demo          (what `make demo` runs)
  python train.py --config=configs/demo.py:seg --workdir=runs/demo/seg --config.data.data_dir=runs/demo/tfds

  Arguments: 'seg' or 'depth'.
"""
from vpd_jax.config_base import base_config

# Scratch training: the UNet learns at the full rate; the (random, frozen) VAE only encodes (spec 1.2).
SCRATCH_PARAM_GROUPS = [dict(pattern="^vae/", frozen=True)]


ARGS = ("seg", "depth")  # every argument get_config accepts


def get_config(arg=None):
    if arg not in ARGS:
        raise ValueError(f"unknown config argument {arg!r}; use one of {ARGS}")
    c = base_config(arg, "vpd_shapes/small")
    c.model.arch = "tiny"
    c.model.class_embeddings = "random"
    c.batch_size = 8
    c.eval_batch_size = 8
    c.total_steps = 800
    c.log_every = 100
    c.ckpt_every = 400
    c.optim.lr = 1e-3
    c.optim.param_groups = SCRATCH_PARAM_GROUPS
    c.eval_at_start = True  # the untrained model's numbers, next to the trained ones
    if arg == "seg":
        c.model.num_classes = 6  # wall, floor, sphere, cube, cylinder, cone
        c.model.fpn_channels = 32
        c.optim.schedule.warmup_steps = 50
        c.eval.seg_crop = (64, 64)
        c.eval.seg_stride = (43, 43)
    else:
        c.model.depth_fusion_channels = 64
        c.model.depth_num_filters = (16, 16, 16)
        c.model.depth_decoder_channels = 16
        c.steps_per_epoch = 100  # the depth schedule ramps up over half the epochs, then down
        c.optim.schedule.min_lr = 1e-5
        c.eval.depth_shift_size = 1  # one window covers a 64x64 image
        c.eval.depth_crop = ""  # the Eigen crop is defined on 480x640 only
    return c

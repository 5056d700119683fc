"""The demo (`make demo`): VPD segmentation and depth trained from scratch on vpd_shapes on a CPU.

No pretrained Stable Diffusion weights can be downloaded offline, so the demo uses the 'tiny' SD-shaped
architecture with random initialisation, random class embeddings and the whole UNet at the head's learning
rate (a scratch run, not the paper's fine-tuning recipe). It shows the full path — data, sharded training,
checkpoints, evaluation, pictures — in a few minutes; its numbers say nothing about the paper's.

  python -m vpd_jax.apps.demo --workdir=runs/demo          (what `make demo` runs)
  python train.py --config=configs/demo.py:seg --workdir=runs/demo/seg --config.data.data_dir=runs/demo/tfds

  Arguments: 'seg' or 'depth'.
"""
from configs.common import check_arg, scratch_tiny, shapes_depth, shapes_seg
from vpd_jax.run.config import base_config

# Scratch training: the UNet learns at the full rate; the (random, frozen) VAE only encodes (spec 1.2).
SCRATCH_PARAM_GROUPS = [dict(pattern="^vae/", frozen=True)]


ARGS = ("seg", "depth")  # every argument get_config accepts


def get_config(arg=None):
    arg = check_arg(arg, ARGS)
    c = base_config(arg, "vpd_shapes/small")
    scratch_tiny(c)
    c.batch_size = 8
    c.eval_batch_size = 8
    c.total_steps = 800
    c.log_every = 100
    c.ckpt_every = 400
    c.optim.lr = 1e-3
    c.optim.param_groups = SCRATCH_PARAM_GROUPS
    c.eval_at_start = True  # the untrained model's numbers, next to the trained ones
    if arg == "seg":
        shapes_seg(c)
        c.optim.schedule.warmup_steps = 50
    else:
        shapes_depth(c)
        c.steps_per_epoch = 100  # the depth schedule ramps up over half the epochs, then down
        c.optim.schedule.min_lr = 1e-5
    return c

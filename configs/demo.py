"""The demo (`make demo`): VPD segmentation and depth trained from scratch on vpd_shapes on a CPU.

No pretrained Stable Diffusion weights can be downloaded offline, so the demo uses the 'tiny' SD-shaped
architecture with random initialisation, random class embeddings and the whole UNet at the head's learning
rate (a scratch run, not the paper's fine-tuning recipe). It shows the full path (data, sharded training,
checkpoints, evaluation, pictures) in a few minutes; its numbers say nothing about the paper's.

Segmentation trains its VAE encoder too (model.train_vae; VPD freezes a pretrained one): a random, frozen VAE
squeezes each 8x8 patch into 4 numbers that keep too little of the image to tell a cube from a cylinder
(`python -m bench.vae_latent_probe` measures it; README, "What `make demo` does").
It trains on 64 px crops of 128 px renders rescaled by 0.5-1.0: a crop sees most of the room around whole objects
that are large enough for the 1/8-resolution head to outline. Depth keeps VPD's frozen VAE: the room's layout carries most of its signal.

  python -m vpd_jax.apps.demo --workdir=runs/demo          (what `make demo` runs)
  python train.py --config=configs/demo.py:seg --workdir=runs/demo/seg --config.data.data_dir=runs/demo/tfds

  Arguments: 'seg' or 'depth'.
"""
from configs.common import check_arg, scratch_tiny, shapes_depth, shapes_seg
from vpd_jax.run.config import base_config

# Scratch depth training: the UNet learns at the full rate; the (random, frozen) VAE only encodes.
FROZEN_VAE = [dict(pattern="^vae/", frozen=True)]


ARGS = ("seg", "depth")  # every argument get_config accepts


def get_config(arg=None):
    arg = check_arg(arg, ARGS)
    c = base_config(arg, "vpd_shapes/demo" if arg == "seg" else "vpd_shapes/small")
    scratch_tiny(c)
    c.batch_size = 8
    c.eval_batch_size = 8
    c.eval_at_start = True  # the untrained model's numbers, next to the trained ones
    c.eval_panels = 0  # the demo draws its own panels (runs/demo/panels/): one program less to compile
    if arg == "seg":
        shapes_seg(c)
        c.total_steps = 1500
        c.log_every = 100
        c.ckpt_every = 500
        c.optim.lr = 2e-3
        c.optim.schedule.warmup_steps = 50
        c.optim.param_groups = []  # everything learns, the VAE included
        c.model.train_vae = True
        c.data.aug.img_scale = (512, 128)  # 128 px images, as rendered
        c.data.aug.ratio_range = (0.5, 1.0)
    else:
        shapes_depth(c)
        c.total_steps = 480
        c.log_every = 60
        c.ckpt_every = 240
        c.optim.lr = 1e-3
        c.optim.param_groups = FROZEN_VAE
        c.steps_per_epoch = 60  # 8 epochs: the depth schedule ramps up over half of them, then down
        c.optim.schedule.min_lr = 1e-5
    return c

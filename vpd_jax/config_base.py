"""Every field of a run's config, with defaults; the files in configs/ start from `base_config` and set what
their task and paper need. Field meanings:

  task                 'seg' | 'depth' | 'refer'
  seed                 parameter init and dropout (the input pipeline has its own, data.seed)
  init                 pretrained Stable Diffusion weights: a diffusers pipeline root or a CompVis file
  resume               another run's checkpoint directory (or one step directory) to start from
  model.arch           'init' (architecture read from `init`) or a preset of vpd_jax.models.presets
  model.text_encoder   refer: CLIP text model folder ('' = the `init` pipeline's text_encoder/)
  model.tokenizer      refer: CLIP tokenizer folder, or 'hash' (WordHashTokenizer, no CLIP files)
  model.class_embeddings  seg / depth: .npy or VPD .pth file, or 'random' (class_embeddings_seed)
  model.num_classes    seg classes / depth scene classes
  model.timestep, latent_scale, use_attn, attn_max_queries (-1: (H/16)(W/16)), stop_grad_attn, gamma_init
                       spec/vpd.md 1.2-1.5
  model.remat_policy   '' (none) or a name in vpd_jax.models.unet.REMAT_POLICIES
  model.attention_query_chunk  0 (all queries at once, as the references) or N: the UNet's attention layers that
                       record no map attend N queries at a time, each chunk's scores recomputed in the backward
                       pass; same result, far less memory where no fused attention kernel exists, and on a CPU
                       also faster (128: the SD1.5 forward at 512 px in 0.7-0.8x the time; BENCHMARKS.md)
  model.dtype          compute dtype 'float32' | 'bfloat16' (params stay float32; norms, softmax in float32)
  batch_size           global training batch (split evenly over hosts)
  eval_batch_size      global eval batch
  total_steps          training steps (micro-batches when optim.grad_accum_steps > 1)
  steps_per_epoch      optimizer updates per epoch, for epoch-based schedules (depth)
  mesh                 sizes of the ('data', 'fsdp', 'tensor') mesh axes; one may be -1
  sharding_rules       logical axis -> mesh axes (vpd_jax.parallel)
  log_every, ckpt_every, keep_ckpts, async_ckpt, eval_every (0 = only at the end), eval_max_batches (0 = all)
  eval_at_start        also evaluate the state a run starts from at step 0 (eval_0.json: the untrained model)
  nonfinite            'stop': a NaN/inf loss or gradient stops the run naming the step; 'skip': the update is
                       skipped and counted. Either way a non-finite update never reaches the parameters.
  nonfinite_check      what decides that a step is non-finite: 'gradients' (loss, gradient norm and learning rate,
                       before the update, which then happens in place; needs optim.eps > 0) or 'updates' (also the
                       update itself, at the cost of about one more copy of the trainable parameters in memory
                       at the step's peak: 3 GiB at SD1.5 size, `python -m bench.run --full`). The references have
                       no guard at all.
  eval.*               evaluation protocol (spec 2.4, 3.6, 4.4)
"""
from __future__ import annotations

import ml_collections

from vpd_jax import parallel
from vpd_jax.data.config import data_config
from vpd_jax.optim import default_optim_config


def base_config(task: str, data_name: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = task
    c.seed = 0
    c.init = ""
    c.resume = ""
    c.model = ml_collections.ConfigDict(dict(
        arch="init", text_encoder="", tokenizer="", class_embeddings="", class_embeddings_seed=0,
        num_classes={"seg": 150, "depth": 27, "refer": 2}[task],
        timestep=1, latent_scale=1.0, use_attn=task != "depth", attn_max_queries=-1, stop_grad_attn=True,
        gamma_init=1e-4, remat_policy="", attention_query_chunk=0, dtype="float32",
        # seg head / loss
        fpn_channels=256, dropout_ratio=0.1, avg_non_ignore=False,
        # depth head
        max_depth=10.0, depth_fusion_channels=1536, depth_num_filters=(32, 32, 32), depth_decoder_channels=192,
    ))
    c.data = data_config(task, data_name)
    c.batch_size = c.data.batch_size_per_host
    c.eval_batch_size = c.data.eval_batch_size_per_host
    c.total_steps = 1000
    c.steps_per_epoch = 0
    c.optim = default_optim_config(f"vpd_{task}")
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = [list(rule) for rule in parallel.DEFAULT_RULES]
    c.log_every = 50
    c.ckpt_every = 1000
    c.keep_ckpts = 3
    c.async_ckpt = True
    c.eval_every = 0
    c.eval_at_start = False
    c.eval_max_batches = 0
    c.nonfinite = "stop"
    c.nonfinite_check = "gradients"
    c.eval = ml_collections.ConfigDict(dict(
        seg_crop=(512, 512), seg_stride=(341, 341), chunk_size=0,
        depth_window=0, depth_shift_size=2, flip=task == "depth", min_depth=1e-3, depth_crop="eigen",
    ))
    return c

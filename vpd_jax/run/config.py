"""Every field of a run's config, with defaults; the files in configs/ start from `base_config` and set what
their task and paper need. Field meanings:

  task                 a task of vpd_jax.tasks.registry: 'seg' | 'depth' | 'refer' | 'ldznet' | 'probe'
  seed                 parameter init and dropout (the input pipeline has its own, data.seed)
  init_rng             the generator of the initial parameters: 'threefry2x32' (JAX's default) or 'hash' (the
                       same distributions from a generator XLA compiles far faster: vpd_jax/run/init_rng.py; the CPU
                       smoke configs use it)
  init                 pretrained Stable Diffusion weights: a diffusers pipeline root or a CompVis file
  resume               another run's checkpoint directory (or one step directory) to start from (a workdir that has
                       checkpoints resumes its own: its data stream continues, so the data, batch size and number
                       of processes must be the checkpoint's; a changed schedule or mesh is allowed and logged)
  model.*              the task's model (its Task.model_config lists the fields; VPD: vpd_jax/tasks/vpd.py):
    arch               'init' (architecture read from `init`) or a preset of vpd_jax.models.presets
    text_encoder       CLIP text model folder ('' = the `init` pipeline's text_encoder/), for tasks with text
    tokenizer          CLIP tokenizer folder, or 'hash' (WordHashTokenizer, no CLIP files)
    class_embeddings   VPD seg / depth: .npy or VPD .pth file, or 'random' (class_embeddings_seed)
    num_classes        VPD seg classes / depth scene classes
    timestep, latent_scale, use_attn, attn_max_queries (-1: (H/16)(W/16)), stop_grad_attn, gamma_init
    train_vae          VPD: False (the VAE is frozen, no gradient); True only for a scratch VAE (configs/demo.py)
                       VPD: docs/reference.md, "VPD backbone", "VPD attention maps", "Text adapter"
  compute.*            how the model computes, not what (vpd_jax/models/compute.py):
    dtype, param_dtype 'float32' | 'bfloat16' (norms and softmax run in float32 either way)
    remat_policy       '' (none) or a name in vpd_jax.models.compute.REMAT_POLICIES, per UNet block
    attention_query_chunk  0 (all queries at once, as the references) or N: the UNet's attention layers that
                       record no map and have more than N keys (self-attention; cross-attention over a few tokens
                       attends at once) attend N queries at a time, each chunk's scores recomputed in the backward
                       pass: the same result with far less memory where no fused attention kernel exists
                       (BENCHMARKS.md measures time and memory)
    attention          kernel of the attention layers that record no map: 'xla' | 'dot_product' | 'cudnn' (GPU) |
                       'splash' | 'flash' (Pallas, TPU)
    map_attention      kernel of the attention layers that record a map: 'xla' | 'pallas' (fused Pallas kernel, TPU)
    attention_block_q, attention_block_kv  the Pallas kernels' query and key tiles (multiples of 128)
    pallas_interpret   run the Pallas kernels in the interpreter, on any platform (slow: tests, CPU checks)
    matmul_precision   'default' | 'high' | 'highest' (float32 matmul passes on TPUs / GPUs)
    conv               'auto' | 'xla' | 'matmul': XLA's convolution or an im2col matrix product ('auto': the matrix
                       product where XLA:CPU's convolution is measured slower; vpd_jax/models/convolution.py)
  batch_size           global training batch (split evenly over hosts)
  eval_batch_size      global eval batch
  total_steps          training steps (micro-batches when optim.grad_accum_steps > 1)
  steps_per_epoch      optimizer updates per epoch, for epoch-based schedules (depth)
  data.*               the input pipeline (vpd_jax.data.config.data_config lists the fields)
  optim.*              the optimizer (vpd_jax.run.optim: default_optim_config and make_optimizer)
  mesh                 sizes of the ('data', 'fsdp', 'tensor') mesh axes; one may be -1
  sharding_rules       logical axis -> mesh axes (vpd_jax.parallel)
  log_every, ckpt_every, keep_ckpts, async_ckpt, eval_every (0 = only at the end), eval_max_batches (0 = all)
  eval_at_start        also evaluate the state a run starts from at step 0 (eval_0.json: the untrained model)
  eval_panels          a training run's evaluations also write pictures of the first N eval images to TensorBoard
                       (eval_panels/<i>: input | ground truth | prediction, vpd_jax/run/evaluation.py EvalPanels):
                       one more forward of N images per evaluation; 0 = none
  nonfinite            'stop': a non-finite step (NaN/inf loss, gradient norm, learning rate, or norm of the new
                       parameters, which also overflows when an update explodes) stops the run naming the step;
                       'skip': the step is skipped, counted and logged as a warning. Either way its update never
                       reaches the parameters, and no checkpoint holds a run that should have stopped.
  nonfinite_max_consecutive  'skip' stops the run after this many consecutive non-finite steps
  nonfinite_check      how the step is checked before it is applied: 'gradients' (a first pass of the update gives
                       the new parameters' norm, then the update happens in place) or 'updates' (the whole new state
                       is computed, then kept or dropped: about one more copy of the trainable parameters in memory
                       at the step's peak; `python -m bench.run --full` measures both). The references have no guard.
  eval.*               the task's evaluation protocol (its Task.eval_config; VPD: docs/reference.md, "Segmentation test
                       protocol", "Depth test protocol", "Referring metrics")
"""
from __future__ import annotations

import json

import ml_collections

from vpd_jax import parallel
from vpd_jax.data.config import data_config
from vpd_jax.run.optim import default_optim_config
from vpd_jax.tasks.registry import task_class


def compute_config() -> ml_collections.ConfigDict:
    """The config.compute section (vpd_jax.models.compute.Compute, as strings)."""
    return ml_collections.ConfigDict(dict(dtype="float32", param_dtype="float32", remat_policy="",
                                          attention_query_chunk=0, attention="xla", map_attention="xla",
                                          attention_block_q=512, attention_block_kv=512, pallas_interpret=False,
                                          matmul_precision="default", conv="auto"))


def base_config(task: str, data_name: str) -> ml_collections.ConfigDict:
    """Every field of a `task` run on the TFDS dataset `data_name`, with the task's and the dataset's defaults."""
    cls = task_class(task)
    c = ml_collections.ConfigDict()
    c.task = task
    c.seed = 0
    c.init_rng = "threefry2x32"
    c.init = ""
    c.resume = ""
    c.model = cls.model_config()
    c.compute = compute_config()
    c.data = data_config(cls.pipeline, data_name)
    c.batch_size = c.data.batch_size_per_host
    c.eval_batch_size = c.data.eval_batch_size_per_host
    c.total_steps = 1000
    c.steps_per_epoch = 0
    c.optim = default_optim_config(cls.optim_preset)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = [list(rule) for rule in parallel.DEFAULT_RULES]
    c.log_every = 50
    c.ckpt_every = 1000
    c.keep_ckpts = 3
    c.async_ckpt = True
    c.eval_every = 0
    c.eval_at_start = False
    c.eval_max_batches = 0
    c.eval_panels = 4
    c.nonfinite = "stop"
    c.nonfinite_max_consecutive = 10
    c.nonfinite_check = "gradients"
    c.eval = cls.eval_config()
    return c


def config_from_json(path: str) -> ml_collections.ConfigDict:
    """The config a run was started with, from its <workdir>/config.json: every field of `base_config` of its task
    and dataset, set to the saved values (JSON's lists back to tuples where the field holds one). A saved field
    that this version's config does not have is an error naming it."""
    with open(path) as f:
        try:
            saved = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a readable run config ({err})") from None
    task, name = saved.get("task"), saved.get("data", {}).get("name") if isinstance(saved.get("data"), dict) else None
    if not (isinstance(task, str) and isinstance(name, str)):
        raise ValueError(f"{path}: not a run config (it needs 'task' and 'data.name')")
    config = base_config(task, name)
    _set_saved_values(config, saved, path, "")
    return config


def _set_saved_values(section: ml_collections.ConfigDict, saved: dict, path: str, prefix: str) -> None:
    unknown = sorted(f"{prefix}{key}" for key in saved if key not in section)
    if unknown:
        raise ValueError(f"{path}: {unknown} are not fields of this version's config (vpd_jax/run/config.py); give "
                         "--config=<the config file> and its overrides instead of reading the run's config.json")
    for key, value in saved.items():
        current = section[key]
        if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
            _set_saved_values(current, value, path, f"{prefix}{key}.")
        else:
            section[key] = _like(current, value)


def _like(current, value):
    """A JSON value in the container types of the field's current value, element by element where the lengths
    agree (JSON has no tuples: sharding rules and crop sizes come back as lists)."""
    if isinstance(current, (tuple, list)) and isinstance(value, list):
        if len(current) == len(value):
            value = [_like(c, v) for c, v in zip(current, value)]
        return tuple(value) if isinstance(current, tuple) else value
    return value

"""Import an authors' released model into a run directory that eval.py, predict.py and train.py (with
config.resume) read like one of our own runs.

  python -m vpd_jax.apps.import_released --config=configs/vpd_seg_ade20k.py --checkpoint=vpd_seg.pth \\
      --workdir=runs/vpd_seg_released
  python eval.py --config=configs/vpd_seg_ade20k.py --workdir=runs/vpd_seg_released <the overrides it prints>

The task is the config's (`config.task`): seg, depth, refer or ldznet; the file must be that task's released
checkpoint (vpd_jax/weights/released). Written to the workdir:
  checkpoints/0/          an Orbax checkpoint of the train state that `setup(config)` lays out (step 0, a fresh
                          optimizer state), with the resolved config
  class_embeddings.npy    seg / depth: the class-embedding buffer of the file (config.model.class_embeddings)
  config.json             the resolved config
  import.json             the file, the overrides eval.py needs, and every key not loaded with the reason
Parts the file does not hold come from the config: refer's frozen CLIP text encoder from config.model.text_encoder
(or config.init's text_encoder/), the tokenizer (refer, ldznet) from config.model.tokenizer (or config.init).
`vpd_jax.weights.released.released_variables` is the conversion without the run directory.
config.model.arch 'init' with no config.init becomes 'sd15': every released model has SD v1.x's shapes.
Nothing is written before the whole file has been read, mapped and checked.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from flax.traverse_util import flatten_dict, unflatten_dict

from vpd_jax import parallel
from vpd_jax.run import checkpoint
from vpd_jax.run.setup import setup, text_encoder_path
from vpd_jax.weights.released import read_released, released_constants, released_format, released_variables

CLASS_EMBEDDINGS_FILE = "class_embeddings.npy"
RELEASED_ARCH = "sd15"  # VPD: SD v1.5; LD-ZNet: SD v1.4, the same shapes


@dataclasses.dataclass
class Imported:
    workdir: str
    config: ml_collections.ConfigDict  # what eval.py / predict.py must be given
    overrides: dict[str, str]  # config fields this import set, as eval.py flags need them
    dropped: dict[str, str]  # file key -> why it was not loaded


def resolved_config(config: ml_collections.ConfigDict, workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
    """A copy of `config` with the fields the import decides, and those fields as {'model.arch': 'sd15', ...}."""
    config = copy.deepcopy(config)
    overrides = {}
    with config.unlocked():
        if config.model.arch == "init" and not config.init:
            config.model.arch = overrides["model.arch"] = RELEASED_ARCH
        if released_format(config.task).constants:
            path = os.path.abspath(os.path.join(workdir, CLASS_EMBEDDINGS_FILE))
            config.model.class_embeddings = overrides["model.class_embeddings"] = path
    return config, overrides


def _abstract_variables(trainer) -> dict:
    """The model's variables (params, batch_stats) as the train state lays them out, as ShapeDtypeStructs."""
    state = trainer.abstract_state
    return {"params": trainer.info.merge(state["params"], state["frozen"]), "batch_stats": state["batch_stats"]}


def _place(tree: dict, shardings: dict, target: dict) -> dict:
    flat_shardings, flat_target = flatten_dict(shardings), flatten_dict(target)
    return unflatten_dict({path: parallel.place(np.asarray(value, flat_target[path].dtype), flat_shardings[path])
                           for path, value in flatten_dict(tree).items()})


def import_released(config: ml_collections.ConfigDict, checkpoint_file: str, workdir: str, *,
                    use_ema: bool = True) -> Imported:
    """Read, map and check `checkpoint_file` (the released model of config.task), then write `workdir` (module
    docstring). `use_ema` (LD-ZNet): the EMA weights the original predicts with, else the live ones."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints: import into a new workdir")
    state = read_released(checkpoint_file, config.task)
    config, overrides = resolved_config(config, workdir)
    constants = released_constants(state, config.task)

    with tempfile.TemporaryDirectory() as staging:  # the task reads its class embeddings from a file when built
        build_config = copy.deepcopy(config)
        if constants:
            with build_config.unlocked():
                build_config.model.class_embeddings = os.path.join(staging, CLASS_EMBEDDINGS_FILE)
            np.save(build_config.model.class_embeddings, constants["class_embeddings"].astype(np.float32))
        run = setup(build_config)
    target = _abstract_variables(run.trainer)
    variables, mapped = released_variables(state, config.task, target, source=checkpoint_file, use_ema=use_ema,
                                           text_encoder=text_encoder_path(config))

    # Everything is checked: write.
    os.makedirs(workdir, exist_ok=True)
    if constants:
        np.save(config.model.class_embeddings, constants["class_embeddings"].astype(np.float32))
    trainer = run.trainer
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(trainer.rules):
        param_shardings = trainer.info.merge(trainer.state_shardings["params"], trainer.state_shardings["frozen"])
        params = _place(variables["params"], param_shardings, target["params"])
        stats = _place(variables.get("batch_stats", {}), trainer.state_shardings["batch_stats"],
                       target.get("batch_stats", {}))
        train_state = jax.jit(trainer.state_from_variables, out_shardings=trainer.state_shardings)(params, stats)
        with checkpoint.Checkpointer(ckpt_dir, async_save=False) as ckpt:
            ckpt.save(0, train_state, config=config, force=True)
            ckpt.wait_until_finished()
    imported = Imported(workdir, config, overrides, mapped.dropped)
    _write_records(imported, checkpoint_file)
    return imported


def _write_records(imported: Imported, checkpoint_file: str) -> None:
    with open(os.path.join(imported.workdir, "config.json"), "w") as f:
        json.dump(checkpoint.config_to_json(imported.config), f, indent=2)
    with open(os.path.join(imported.workdir, "import.json"), "w") as f:
        json.dump({"checkpoint": os.path.abspath(checkpoint_file), "task": imported.config.task,
                   "eval_overrides": eval_flags(imported.overrides),
                   "dropped": dict(sorted(imported.dropped.items()))}, f, indent=2)


def eval_flags(overrides: dict[str, str]) -> list[str]:
    return [f"--config.{key}={value}" for key, value in overrides.items()]


# --------------------------------------------------------------------------------------------- entry point


def main(argv):
    from absl import app, flags

    from vpd_jax.run import launch

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    if launch.printed_config(f.config):
        return
    imported = import_released(f.config, f.checkpoint, f.workdir, use_ema=f.use_ema)
    logging.info("not loaded (%d keys): %s", len(imported.dropped), sorted(set(imported.dropped.values())))
    print(f"wrote {imported.workdir}; evaluate it with eval.py, the same --config and overrides, and\n  "
          + " ".join([f"--workdir={imported.workdir}", *eval_flags(imported.overrides)]))


def cli() -> None:
    """`python -m vpd_jax.apps.import_released --config=... --checkpoint=... --workdir=...`"""
    from absl import app, flags
    from ml_collections import config_flags

    from vpd_jax.run import launch

    config_flags.DEFINE_config_file("config", None, "The task's config file (configs/*.py[:arg]).", lock_config=True)
    flags.DEFINE_string("checkpoint", None, "The released checkpoint file.")
    flags.DEFINE_string("workdir", None, "The run directory to write (must not hold checkpoints yet).")
    flags.DEFINE_bool("use_ema", True, "ldznet: import the EMA weights (the original predicts with them).")
    flags.mark_flags_as_required(["config", "checkpoint", "workdir"])
    app.run(main, flags_parser=launch.parse_flags)


if __name__ == "__main__":
    cli()

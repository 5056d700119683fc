"""A config file (for ml_collections' --config flag) whose argument is a run directory: the config that run was
started with, read from <workdir>/config.json (vpd_jax.run.config.config_from_json). eval.py and predict.py use it
when they are given --workdir=W but no --config: `--config.x=value` overrides then apply on top of the run's config.
"""
import os

from vpd_jax.run.config import config_from_json


def get_config(workdir=None):
    if not workdir:
        raise ValueError("this config file takes a run directory as its argument: <this file>:<workdir>")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the run directory has no config.json (a run writes it at start); give "
                                "--config=configs/<file>.py[:arg] with the run's overrides instead")
    return config_from_json(path)

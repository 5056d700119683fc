"""vpd_jax/run/start.py: what reaches the pretrained-weight loaders, and the key a scratch start draws from."""
import jax
import ml_collections
import numpy as np
import pytest

from tests.tasks.test_ldznet import tiny_config, TINY
from vpd_jax.run import checkpoint, start
from vpd_jax.run.init_rng import init_key
from vpd_jax.tasks.registry import make_task


class _Called(Exception):
    pass


@pytest.mark.parametrize("copy", ["model", "model_ema"])
def test_ldznet_compvis_unet_picks_the_unet_copy_config_init_is_read_with(copy, monkeypatch):
    def load_unet(path, **kwargs):
        raise _Called(path, kwargs)

    monkeypatch.setattr(start, "load_unet", load_unet)
    config = tiny_config()
    config.init, config.model.compvis_unet = "/sd/sd-v1-4-full-ema.ckpt", copy
    with pytest.raises(_Called) as called:
        start._pretrained_params(config, make_task(config, TINY))
    path, kwargs = called.value.args
    assert path == config.init and kwargs["compvis_unet"] == copy


@pytest.mark.parametrize("init_rng", ["threefry2x32", "hash"])
def test_a_scratch_start_initialises_from_the_key_of_config_seed_and_init_rng(init_rng, tmp_path):
    """start_state hands the trainer's initialiser init_key(config.seed, config.init_rng)."""
    class Trainer:  # what start_state reads of a trainer, for a state that is just the key's data
        state_shardings = None
        abstract_state = None

        @staticmethod
        def create_state(rng):
            return {"key_data": jax.random.key_data(rng)}

    config = ml_collections.ConfigDict(dict(seed=7, init_rng=init_rng, resume="", init=""))
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        started = start.start_state(config, Trainer(), ckpt, None, pretrained={})
    assert started.source == "scratch"
    np.testing.assert_array_equal(started.state["key_data"], jax.random.key_data(init_key(7, init_rng)))
    assert init_rng == "threefry2x32" or not np.array_equal(
        started.state["key_data"], jax.random.key_data(init_key(7, "threefry2x32")))

"""vpd_jax/run/start.py: what reaches the pretrained-weight loaders, the key a scratch start draws from, and what
a start from pretrained weights draws."""
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from tests.helpers.tasks import smoke_config
from tests.run.test_train import save_tiny_sd_root
from tests.tasks.test_ldznet import tiny_config, TINY
from vpd_jax import parallel
from vpd_jax.run import checkpoint, start
from vpd_jax.run.init_rng import init_key
from vpd_jax.run.setup import resolve_architecture
from vpd_jax.run.trainer import build_trainer
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


def test_a_pretrained_start_holds_the_files_weights_and_a_scratch_starts_values_elsewhere(tmp_path):
    """start_state with config.init (a tiny SD pipeline, seg smoke config, fsdp over 2 devices): the parameters the
    files provide are the files' (read_pretrained), every other parameter and the batch statistics are those a
    scratch start with the same seed and init_rng draws, bit for bit (pretrained_state draws only those), and the
    optimizer state is built from the result as for any fresh state."""
    root = save_tiny_sd_root(str(tmp_path / "sd"))
    config = smoke_config("seg", init=root, **{"model.arch": "init"})
    task = make_task(config, resolve_architecture(config))
    mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, jax.devices()[:2])
    trainer = build_trainer(config, task, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
            started = start.start_state(config, trainer, ckpt, None)
        scratch = jax.device_get(jax.jit(trainer.create_state)(init_key(config.seed, config.init_rng)))
        loaded = start.read_pretrained(trainer, root)
        params = flatten_dict(trainer.info.merge(scratch["params"], scratch["frozen"]))
        assert loaded and set(loaded) < set(params)
        params.update(loaded)
        expected = jax.device_get(jax.jit(trainer.state_from_variables)(unflatten_dict(params),
                                                                         scratch["batch_stats"]))
    assert (started.source, started.step) == ("init", 0)
    state = jax.device_get(started.state)
    assert jax.tree.structure(state) == jax.tree.structure(expected)
    for (path, ours), theirs in zip(jax.tree.leaves_with_path(state), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(ours, theirs, err_msg=jax.tree_util.keystr(path))

"""vpd_jax/run/start.py: what reaches the pretrained-weight loaders."""
import pytest

from tests.tasks.test_ldznet import tiny_config, TINY
from vpd_jax.run import start
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

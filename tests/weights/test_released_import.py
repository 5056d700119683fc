"""vpd_jax/apps/import_released.py: nothing is written for a file that does not import, and a run directory that
already holds checkpoints is never overwritten (the whole import runs in tests/weights/test_released_vpd.py)."""
from __future__ import annotations

import os

import pytest
import torch

from vpd_jax.apps.import_released import eval_flags, import_released, resolved_config
from vpd_jax.run.config import base_config
from vpd_jax.weights.released import ReleasedCheckpointError


def _config(task="seg"):
    c = base_config(task, "vpd_shapes/small")
    c.model.arch = "tiny"
    return c


def test_a_wrong_task_or_truncated_file_writes_nothing(tmp_path):
    refer_file = tmp_path / "refer.pth"
    torch.save({"model": {"classifier.conv1_4.weight": torch.zeros(1),
                          "unet.unet.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}}, refer_file)
    workdir = tmp_path / "run"
    with pytest.raises(ReleasedCheckpointError, match="import it with task 'refer'"):
        import_released(_config("seg"), str(refer_file), str(workdir))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(refer_file.read_bytes()[:100])
    with pytest.raises(ReleasedCheckpointError, match="truncated.pth.*truncated"):
        import_released(_config("refer"), str(truncated), str(workdir))
    assert not workdir.exists()


def test_an_existing_run_is_not_overwritten(tmp_path):
    (tmp_path / "run" / "checkpoints" / "1000").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        import_released(_config(), str(tmp_path / "any.pth"), str(tmp_path / "run"))


def test_the_config_names_the_written_class_embeddings_and_a_preset_architecture(tmp_path):
    c = base_config("seg", "vpd_shapes/small")  # arch 'init' and no config.init: the released models' SD v1.x
    config, overrides = resolved_config(c, str(tmp_path / "run"))
    assert config.model.arch == "sd15" and c.model.arch == "init"
    assert config.model.class_embeddings == os.path.join(str(tmp_path), "run", "class_embeddings.npy")
    assert eval_flags(overrides) == ["--config.model.arch=sd15",
                                     f"--config.model.class_embeddings={config.model.class_embeddings}"]
    refer, overrides = resolved_config(_config("refer"), str(tmp_path / "run"))
    assert overrides == {} and refer.model.arch == "tiny"

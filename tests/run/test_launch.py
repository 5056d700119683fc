"""eval.py / predict.py read a run's own config: vpd_jax.run.launch.with_run_config and
vpd_jax.run.config.config_from_json."""
import json

import pytest
from flax.traverse_util import flatten_dict

from tests.test_configs import get_config
from vpd_jax.run import launch
from vpd_jax.run.config import config_from_json
from vpd_jax.run.workdir_config import get_config as workdir_config


def test_a_workdir_without_config_gets_its_run_config_and_keeps_the_overrides():
    run_config = f"--config={launch.WORKDIR_CONFIG}:runs/x"
    assert launch.with_run_config(["eval.py", "--workdir=runs/x", "--config.eval_max_batches=2"]) == [
        "eval.py", run_config, "--workdir=runs/x", "--config.eval_max_batches=2"]
    assert launch.with_run_config(["eval.py", "--workdir", "runs/x"])[1] == run_config
    given = ["eval.py", "--config=configs/demo.py:seg", "--workdir=runs/x"]
    assert launch.with_run_config(given) == given
    assert launch.with_run_config(["predict.py", "--zeroshot", "--sd=/sd"]) == ["predict.py", "--zeroshot", "--sd=/sd"]


@pytest.mark.parametrize("file, arg", [("demo.py", "seg"), ("vpd_refer.py", "refcocog"),
                                       ("ldznet_phrasecut.py", ""), ("probe_sd_features.py", "smoke")])
def test_a_run_config_reads_back_as_it_was_written(tmp_path, file, arg):
    config = get_config(file, arg)
    config.data.data_dir = "/data/tfds"
    config.compute.attention_query_chunk = 128
    if "seg_ratios" in config.eval:
        config.eval.seg_ratios = (1.0, 1.5)
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    restored = workdir_config(str(tmp_path))
    assert flatten_dict(restored.to_dict()) == flatten_dict(config.copy_and_resolve_references().to_dict())


def test_a_config_json_with_fields_this_version_lacks_is_refused_naming_them(tmp_path):
    saved = json.loads(get_config("demo.py", "depth").to_json_best_effort())
    saved["model"]["wings"] = 2
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"\['model.wings'\] are not fields of this version's config"):
        config_from_json(str(tmp_path / "config.json"))
    with pytest.raises(FileNotFoundError, match="the run directory has no config.json"):
        workdir_config(str(tmp_path / "elsewhere"))

"""vpd_jax/run/evaluation.py: the eval result files of a run."""
import json

from vpd_jax.run.evaluation import write_result


def test_an_earlier_result_of_the_same_step_is_kept_not_overwritten(tmp_path):
    workdir = tmp_path / "not_yet_there"
    path = write_result(str(workdir), 800, {"mIoU": 0.5})
    assert json.loads(open(path).read()) == {"step": 800, "mIoU": 0.5}
    write_result(str(workdir), 800, {"mIoU": 0.5})  # the same result: nothing to keep
    assert sorted(p.name for p in workdir.iterdir()) == ["eval_800.json"]
    write_result(str(workdir), 800, {"mIoU": 0.6})
    assert json.loads((workdir / "eval_800.1.json").read_text())["mIoU"] == 0.5
    assert json.loads((workdir / "eval_800.json").read_text())["mIoU"] == 0.6

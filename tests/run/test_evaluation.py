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


def test_per_class_metrics_carry_the_class_names():
    import numpy as np

    from tests.helpers.tasks import smoke_config
    from vpd_jax import metrics
    from vpd_jax.models import presets
    from vpd_jax.run.evaluation import per_class_scalars, per_class_table
    from vpd_jax.tasks.registry import make_task

    task = make_task(smoke_config("seg"), presets.architecture("tiny"))
    accumulator = task.new_metric()
    labels = np.array([[[0, 1], [2, 2]]])
    accumulator.update(metrics.segmentation_areas(np.array([[[0, 1], [2, 0]]]), labels, task.num_classes))
    result = accumulator.result()
    assert result["classes"] == ["wall", "floor", "sphere", "cube", "cylinder", "cone"]
    scalars = per_class_scalars(result)
    assert scalars["IoU/wall"] == 0.5 and scalars["IoU/floor"] == 1.0 and scalars["IoU/sphere"] == 0.5
    assert np.isnan(scalars["IoU/cone"])  # absent from labels and predictions
    table = per_class_table(result).splitlines()
    assert table[0].split() == ["class", "IoU", "Acc"] and table[2].split() == ["floor", "1.0000", "1.0000"]

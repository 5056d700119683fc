"""vpd_jax/run/best.py: the best checkpoint by the task's metric, kept beside the last ones."""
import json

import jax
import numpy as np
import pytest

from tests.run.test_train import assert_trees_equal, regression_batch, regression_trainer
from vpd_jax.run import checkpoint
from vpd_jax.run.best import BEST_DIR, BEST_FILE, BestCheckpoint
from vpd_jax.tasks.registry import TASKS


def test_the_vpd_tasks_select_as_the_originals():
    assert TASKS["seg"].best_metric == ("mIoU", "max")
    assert TASKS["depth"].best_metric == ("rmse", "min")
    assert TASKS["refer"].best_metric == ("oIoU", "max")


@pytest.mark.parametrize("mode, values, best_index", [("min", [0.5, 0.4, 0.45, float("nan")], 1),
                                                      ("max", [0.2, 0.1, 0.3, 0.25], 2)])
def test_only_an_improvement_is_saved_and_a_resumed_run_compares_with_its_record(tmp_path, mode, values,
                                                                                  best_index):
    trainer, state = regression_trainer(lr=1e-2)
    step_fn = trainer.jit_train_step()
    states = []
    best = BestCheckpoint(str(tmp_path), ("rmse", mode))
    assert not best.offer(state, 0, {"rmse": 0.0})  # the untrained state is never a candidate
    for i, value in enumerate(values):
        state, _ = step_fn(state, regression_batch(trainer), {})
        states.append(jax.device_get(state))
        saved = best.offer(state, i + 1, {"rmse": value})
        assert saved == (value == max(values[: i + 1]) if mode == "max" else value == min(values[: i + 1]))
    best.close()
    record = json.loads((tmp_path / BEST_FILE).read_text())
    assert record == {"step": best_index + 1, "metric": "rmse", "mode": mode, "value": values[best_index]}
    with checkpoint.Checkpointer(tmp_path / BEST_DIR, read_only=True) as ckpt:
        assert ckpt.all_steps() == [best_index + 1]
        restored = jax.device_get(ckpt.restore(best_index + 1, trainer.abstract_state))
    assert_trees_equal(restored, states[best_index], "the best state")

    resumed = BestCheckpoint(str(tmp_path), ("rmse", mode))
    worse = values[best_index] + (-1.0 if mode == "max" else 1.0)
    assert not resumed.offer(state, 9, {"rmse": worse})
    with pytest.raises(KeyError, match="no 'rmse' to select"):
        resumed.offer(state, 10, {"mIoU": 0.5})
    with pytest.raises(ValueError, match="records the best 'rmse'"):
        BestCheckpoint(str(tmp_path), ("oIoU", "max"))
    np.testing.assert_equal(BestCheckpoint(str(tmp_path), None).offer(state, 11, {}), False)

"""The best checkpoint of a run by its task's metric (`Task.best_metric`), as the originals select their reported
epoch (depth by RMSE, referring segmentation by oIoU), kept beside the last ones:

  <workdir>/checkpoints_best/<step>/   the state of the best evaluation so far (one step; no data iterator)
  <workdir>/best.json                  {"step", "metric", "mode", "value"} of that evaluation

`eval.py --workdir=<workdir> --step=<best.json's step>` does not see it (it reads checkpoints/); give
`--config.resume=<workdir>/checkpoints_best` instead, or predict from it the same way. A resumed run goes on
comparing with the best it recorded. The untrained state (step 0) is never a candidate.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
from absl import logging

from vpd_jax.run import checkpoint

BEST_DIR, BEST_FILE = "checkpoints_best", "best.json"


class BestCheckpoint:
    """Keeps the state of the best evaluation by (metric, 'max' | 'min'); a no-op for a task without a metric."""

    def __init__(self, workdir: str, best_metric: tuple[str, str] | None):
        self.workdir = workdir
        self.metric, self.mode = best_metric if best_metric else (None, None)
        if self.mode not in (None, "max", "min"):
            raise ValueError(f"best_metric mode {self.mode!r}: use 'max' or 'min'")
        self.record = self._read_record()
        self._ckpt = None

    def _read_record(self) -> dict | None:
        path = os.path.join(self.workdir, BEST_FILE)
        if self.metric is None or not os.path.exists(path):
            return None
        with open(path) as f:
            record = json.load(f)
        if record.get("metric") != self.metric or record.get("mode") != self.mode:
            raise ValueError(f"{path} records the best {record.get('metric')!r} ({record.get('mode')}), but this "
                             f"task selects by {self.metric!r} ({self.mode}): use another --workdir")
        return record

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.record is None:
            return True
        best = self.record["value"]
        return value > best if self.mode == "max" else value < best

    def offer(self, state: Any, step: int, result: dict, config: Any = None) -> bool:
        """Saves `state` as the best when `result[metric]` improves on the record; returns whether it did. Every
        process calls it with the same result (evaluation statistics are global)."""
        if self.metric is None or step <= 0:
            return False
        if self.metric not in result:
            raise KeyError(f"the evaluation result has no {self.metric!r} to select the best checkpoint by; it has "
                           f"{sorted(result)}")
        value = float(result[self.metric])
        if not self.improves(value):
            return False
        if self._ckpt is None:
            self._ckpt = checkpoint.Checkpointer(os.path.join(self.workdir, BEST_DIR), max_to_keep=1,
                                                 async_save=False)
        self._ckpt.save(step, state, config=config, force=True)
        self._ckpt.wait_until_finished()
        self.record = {"step": int(step), "metric": self.metric, "mode": self.mode, "value": value}
        if jax.process_index() == 0:
            path = os.path.join(self.workdir, BEST_FILE)
            with open(path + ".tmp", "w") as f:
                json.dump(self.record, f, indent=2)
            os.replace(path + ".tmp", path)  # the record names a complete checkpoint or the previous one
        logging.info("best %s so far: %.6g at step %d (%s)", self.metric, value, step, self._ckpt.directory)
        return True

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()

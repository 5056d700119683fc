"""train.py with test hooks: `python -m tests.run.train_worker [hook flags] --config=... --workdir=... [--config.x=v]`.

Without hook flags it is exactly train.py. The hooks change what the run is fed or when it is killed, never how it
trains:

--emulate_processes=N   one process assembles the global batches that N processes would: per step, the
                        concatenation (in process order) of the N per-host streams, each with process i's TFDS
                        subsplit, shuffle and augmentation seeds and per-host batch size (vpd_jax/data/pipelines.py).
                        Multi-process runs are compared with this (tests/test_train.py explains why).
--nan_at_batch=K        the K-th training batch this process draws has a NaN image (a corrupt input): train step K
                        of a run started from scratch.
--hold_save_of_step=K   holds the finalisation of step K's asynchronous checkpoint (the rename of its tmp directory)
                        for 120 s, after printing "HOLDING K" to stdout, so a test can SIGKILL the run inside an
                        asynchronous save.
"""
from __future__ import annotations

import copy
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import train  # noqa: E402  (defines train.py's flags; imports no JAX)
from vpd_jax.run import launch  # noqa: E402  # noqa: E402

flags.DEFINE_integer("emulate_processes", 0, "Feed the global batches of this many processes' input streams.")
flags.DEFINE_integer("nan_at_batch", 0, "Put NaN in the image of this (1-based) training batch.")
flags.DEFINE_integer("hold_save_of_step", -1, "Hold the finalisation of this step's checkpoint for 120 s.")


class HostStreams:
    """The per-host iterators of N processes as one iterator of global batches (checkpointable like one)."""

    def __init__(self, iterators):
        self.iterators = iterators
        self.dataset = iterators[0].dataset  # element_spec: the batch dimension is None

    def __iter__(self):
        return self

    def __next__(self):
        import numpy as np

        batches = [next(it) for it in self.iterators]
        return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

    def save(self, prefix: str) -> None:
        for i, it in enumerate(self.iterators):
            it.save(f"{prefix}-host{i}")

    def restore(self, prefix: str) -> None:
        for i, it in enumerate(self.iterators):
            it.restore(f"{prefix}-host{i}")


def install_hooks(f) -> None:
    from vpd_jax.data import pipelines
    from vpd_jax.run import checkpoint, training

    if f.emulate_processes > 1:
        n, make = f.emulate_processes, pipelines.make_train_iterator

        def emulated(data, tokenizer=None):
            host = copy.deepcopy(data)
            host.unlock()
            host.batch_size_per_host = data.batch_size_per_host // n
            host.lock()
            return HostStreams([make(host, tokenizer=tokenizer, process_index=i, process_count=n) for i in range(n)])

        pipelines.make_train_iterator = emulated

    if f.nan_at_batch > 0:
        import numpy as np

        device_batch, drawn = training.device_batch, [0]

        def poisoned(batch, sharding):
            drawn[0] += 1
            if drawn[0] == f.nan_at_batch:
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            return device_batch(batch, sharding)

        training.device_batch = poisoned

    if f.hold_save_of_step >= 0:
        finalize = checkpoint.DataIteratorHandler.finalize

        def held(self, directory):
            if os.path.basename(os.path.dirname(str(directory))).startswith(f"{f.hold_save_of_step}."):
                print("HOLDING", f.hold_save_of_step, flush=True)
                time.sleep(120)
            finalize(self, directory)

        checkpoint.DataIteratorHandler.finalize = held


def main(argv):
    install_hooks(flags.FLAGS)
    train.main(argv)


if __name__ == "__main__":
    app.run(main, flags_parser=launch.parse_flags)

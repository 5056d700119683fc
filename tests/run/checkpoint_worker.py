"""A tiny training run for the kill-and-resume tests: `python -m tests.run.checkpoint_worker WORKDIR LOG STEPS [options]`.

A state sharded over 4 CPU devices is updated from a shuffled, repeated, stateless-random tf.data pipeline, and
saved asynchronously (with the iterator and the config) every 2 steps. It starts through `restore_or_initialize`,
so a restarted run continues from the last complete checkpoint. Every line of LOG (JSON) records one event:
{"start": step, "source": ..., "w": [...]} and {"step": s, "batch": [...], "w": [...]} after each update, so the
test can compare a killed-and-restarted run with an uninterrupted one value by value.

--slow_finalize_step K holds the finalisation (the rename of the tmp directory) of step K's save for 30 s: the test
kills the process inside that window, i.e. during an asynchronous save, deterministically.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)

import jax.numpy as jnp  # noqa: E402
import tensorflow as tf  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from vpd_jax import parallel  # noqa: E402
from vpd_jax.data.iterator import DataIterator  # noqa: E402
from vpd_jax.run import checkpoint  # noqa: E402
from vpd_jax.run.start import restore_or_initialize  # noqa: E402

WIDTH = 8
SAVE_EVERY = 2


def dataset() -> tf.data.Dataset:
    numbers = tf.data.Dataset.range(50).shuffle(16, seed=3, reshuffle_each_iteration=True).repeat()
    seeds = tf.data.Dataset.random(seed=5).batch(2)

    def element(n, seed):
        noise = tf.random.stateless_uniform((WIDTH,), seed=seed)
        return {"x": noise + tf.cast(n, tf.float32)}

    return tf.data.Dataset.zip(numbers, seeds).map(element, num_parallel_calls=2).batch(2).prefetch(2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("log")
    parser.add_argument("steps", type=int)
    parser.add_argument("--step_sleep", type=float, default=0.0)
    parser.add_argument("--slow_finalize_step", type=int, default=-1)
    args = parser.parse_args()

    if args.slow_finalize_step >= 0:
        original = checkpoint.DataIteratorHandler.finalize

        def slow_finalize(self, directory):
            if os.path.basename(os.path.dirname(str(directory))).startswith(f"{args.slow_finalize_step}."):
                time.sleep(30)
            original(self, directory)

        checkpoint.DataIteratorHandler.finalize = slow_finalize

    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 1})
    shardings = {"w": NamedSharding(mesh, PartitionSpec("fsdp")), "step": NamedSharding(mesh, PartitionSpec())}
    abstract = {"w": jax.ShapeDtypeStruct((WIDTH,), jnp.float32, sharding=shardings["w"]),
                "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings["step"])}

    def init_fn():
        return jax.jit(lambda: {"w": jnp.zeros(WIDTH), "step": jnp.zeros((), jnp.int32)}, out_shardings=shardings)()

    @jax.jit
    def update(state, x):
        return {"w": 0.9 * state["w"] + jnp.sin(x).mean(0), "step": state["step"] + 1}

    data = DataIterator(dataset())
    ckpt = checkpoint.Checkpointer(args.workdir, max_to_keep=2, save_interval_steps=SAVE_EVERY, async_save=True)
    start = restore_or_initialize(ckpt, abstract_state=abstract, init_fn=init_fn, data_iterator=data)
    state = start.state
    assert state["w"].sharding == shardings["w"], state["w"].sharding
    assert int(state["step"]) == start.step
    with open(args.log, "a") as log:
        log.write(json.dumps({"start": start.step, "source": start.source, "w": state["w"].tolist()}) + "\n")
        log.flush()
        print("READY", start.step, flush=True)
        for step in range(start.step + 1, args.steps + 1):
            batch = next(data)["x"]
            state = update(state, batch)
            log.write(json.dumps({"step": step, "batch": batch.tolist(), "w": state["w"].tolist()}) + "\n")
            log.flush()
            if ckpt.save(step, state, data_iterator=data, config={"steps": args.steps}):
                print("SAVING", step, flush=True)
            time.sleep(args.step_sleep)
    ckpt.wait_until_finished()
    ckpt.close()
    print("DONE", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()

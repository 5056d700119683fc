"""`python -m bench.init_compile`: how long XLA takes to compile a run's initialiser (the jitted `create_state` that
train.py runs on a fresh start, sharded out as train.py shards it) with each `config.init_rng` generator, next to
the same config's train step; and how large the compiled initialiser is in the persistent compilation cache (what
every later process deserialises).

Each measurement runs in a fresh process with no compilation cache, on one CPU device, under the XLA flags this
command was given (`XLA_FLAGS`): the defaults are train.py's on a CPU; the test suite runs with
`--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false`.

  python -m bench.init_compile [--configs vpd_seg_ade20k.py:smoke ...] [--no-train-step] [--out rows.jsonl]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.experimental.serialize_executable

from bench import machine
from vpd_jax.run.init_rng import INIT_RNGS, init_key
from vpd_jax.run.setup import setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = ("vpd_seg_ade20k.py:smoke", "vpd_depth_nyu.py:smoke", "vpd_refer.py:smoke")


def measure(config_arg: str, program: str, init_rng: str) -> dict:
    """Lower + compile seconds of one program ('init' or 'train_step') of `config_arg` in this process."""
    name, _, arg = config_arg.partition(":")
    config = importlib.import_module(f"configs.{name.removesuffix('.py')}").get_config(arg or None)
    config.init_rng = init_rng
    trainer = setup(config, devices=jax.devices()[:1]).trainer
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        start = time.perf_counter()
        if program == "init":
            lowered = jax.jit(trainer.create_state, out_shardings=trainer.state_shardings).lower(
                init_key(config.seed, init_rng))
        else:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    (trainer.example, trainer.task.constants))
            lowered = trainer.jit_train_step().lower(trainer.abstract_state, *abstract)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        done = time.perf_counter()
    serialized = jax.experimental.serialize_executable.serialize(compiled)[0]
    return dict(config=config_arg, program=program, init_rng=init_rng if program == "init" else "",
                lower_s=round(lowered_at - start, 2), compile_s=round(done - lowered_at, 2),
                executable_mb=round(len(serialized) / 2 ** 20, 2))


def run_one(config_arg: str, program: str, init_rng: str) -> dict:
    """`measure` in a fresh Python process (no in-memory or persistent cache)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["PYTHONPATH"] = REPO
    proc = subprocess.run([sys.executable, "-m", "bench.init_compile", "--one", config_arg, program, init_rng],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        return dict(config=config_arg, program=program, init_rng=init_rng, error=proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict]) -> str:
    lines = ["| config | program | init_rng | lower (s) | compile (s) | executable (MB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['program']} | {r['init_rng']} | failed | | |")
        else:
            lines.append(f"| {r['config']} | {r['program']} | {r['init_rng'] or '-'} | {r['lower_s']:.1f} | "
                         f"{r['compile_s']:.1f} | {r['executable_mb']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", nargs=3, metavar=("CONFIG", "PROGRAM", "INIT_RNG"), help=argparse.SUPPRESS)
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--no-train-step", action="store_true", help="only the initialisers")
    parser.add_argument("--out", help="also write the rows as JSON lines to this file")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    description = machine.describe()
    print(f"# {description['cpu_model']}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"{machine.now()}, {machine.code_version(REPO)}", flush=True)
    rows = []
    for config_arg in args.configs:
        jobs = [("init", rng) for rng in INIT_RNGS] + ([] if args.no_train_step else [("train_step", "")])
        for program, rng in jobs:
            rows.append(run_one(config_arg, program, rng))
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()

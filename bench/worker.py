"""One measurement in its own process: `python -m bench.worker KIND < spec.json` prints one JSON result.

KIND is one of RUNNERS: `jax` / `pytorch` (the backbone comparison, bench/backbone_jax.py, backbone_torch.py),
`compiled` (compile-only cost and memory, bench/compiled.py), `input` (bench/input_pipeline.py), `probe` (which
accelerators the frameworks see). bench/run.py starts one worker per framework and case, so each framework's
peak RSS is its own and neither framework's thread pools or allocator caches are in the other's way.

Before any framework is imported, the worker restricts itself to the first `spec["threads"]` available CPUs and
sets the OpenMP / MKL / OpenBLAS pool sizes to the same number (XLA:CPU sizes its pool from the affinity mask,
PyTorch gets `torch.set_num_threads`), and adds the runner's and the spec's `xla_flags` to XLA_FLAGS. The result
is written to the original stdout; file descriptor 1 is pointed at stderr first, so whatever the libraries print
(also from C++) cannot corrupt it.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

from bench import machine

# XLA:CPU's fast compile (the test suite's flags, tests/conftest.py): backend optimisation level 0, no fusion
# emitters. It changes code generation only, not the HLO passes, fusion decisions or buffer assignment that cost
# and memory analysis read, so it serves the compile-only runner; timed runs use it only in `--quick` mode.
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"

# The compile-only runner also turns off XLA:CPU's concurrency-optimised scheduler: it orders the program for
# parallel execution on the CPU's thread pool and so keeps more buffers alive at once (the VPD-seg train step
# with nonfinite_check='updates', batch 1: 24.9 GiB instead of 19.7), which tells nothing about a TPU or GPU,
# whose schedulers differ.
COMPILE_ONLY_XLA_FLAGS = FAST_COMPILE_XLA_FLAGS + " --xla_cpu_enable_concurrency_optimized_scheduler=false"

# kind -> (module with run(spec) -> dict, XLA flags, fake CPU devices); None: no framework setup.
RUNNERS = {
    "jax": ("bench.backbone_jax", "", None),
    "pytorch": ("bench.backbone_torch", "", None),
    "compiled": ("bench.compiled", COMPILE_ONLY_XLA_FLAGS, 8),  # meshes of up to 8 devices, nothing runs
    "input": ("bench.input_pipeline", "", None),
    "probe": ("bench.worker", "", None),
}


def run(spec: dict) -> dict:
    """The `probe` runner: JAX's default backend and whether PyTorch has CUDA (on a machine without either,
    `python -m bench.run --device` stops with this)."""
    import jax
    import torch

    return dict(jax_backend=jax.default_backend(), jax_devices=[str(d) for d in jax.devices()],
                torch_cuda=torch.cuda.is_available(),
                torch_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def configure(kind: str, spec: dict) -> None:
    """Pin the process and size the thread pools and XLA before the runner's module imports its framework."""
    threads = spec.get("threads", len(machine.available_cpus()))
    machine.pin_to_cpus(threads)
    os.environ.update(machine.thread_env(threads))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _, runner_flags, cpu_devices = RUNNERS[kind]
    flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), runner_flags, spec.get("xla_flags", "")) if f)
    if flags:
        os.environ["XLA_FLAGS"] = flags
    if cpu_devices:
        import jax

        jax.config.update("jax_num_cpu_devices", cpu_devices)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in RUNNERS:
        print(f"usage: python -m bench.worker {{{'|'.join(RUNNERS)}}} < spec.json", file=sys.stderr)
        return 2
    kind = argv[0]
    result_stream = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    spec = json.load(sys.stdin)
    configure(kind, spec)
    result = importlib.import_module(RUNNERS[kind][0]).run(spec)
    json.dump(result, result_stream)
    result_stream.write("\n")
    result_stream.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`python -m bench.run` (`make bench`): the benchmarks of issue 8, back to back, into results.json and BENCHMARKS.md.

Parts (`--only`): `backbone` (each case in JAX, then in PyTorch: same shapes, dtype, weights and CPUs, one
process each), `compiled` (compile-only FLOPs and memory: one process per program group, as many at a time as
the plan allows, bench/compiled_jobs.py), `input` (tf.data throughput). What each mode runs is
in bench/plan.py. With `--only`, the other parts of an earlier run of the same mode and device in the output
files are kept (each part records when it ran). The orchestrating process starts no framework backend.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import time

from bench import cases as cases_lib
from bench import compiled_jobs, machine, report
from bench.plan import Plan, backbone_spec, make_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("backbone", "compiled", "input")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def call_worker(kind: str, spec: dict) -> dict:
    """Run `python -m bench.worker kind` on `spec`; its result, or {'error': ...} if the process failed."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.worker", kind], input=json.dumps(spec), cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with {proc.returncode}"
        return dict(error=f"bench.worker {kind} {how} after {seconds:.0f} s (its stderr is in the run's log)")
    return dict(json.loads(proc.stdout), worker_s=seconds)


def _framework_row(result: dict) -> dict:
    """A one-case worker result flattened: process facts (setup, parameters, threads) and the case's row."""
    if "error" in result:
        return result
    return {**{k: v for k, v in result.items() if k != "cases"}, **result["cases"][0]}


def pytorch_skip_reason(plan: Plan, case: cases_lib.Case, device: str, cpu_flags: list[str]) -> str | None:
    """Why PyTorch does not run `case`, or None. On a CPU without native bfloat16, PyTorch's autocast emulates it
    and an SD1.5 bfloat16 case outlasts the rest of the run (README, "Speed and memory"); the JAX side still runs. The
    tiny UNet of --quick is cheap either way and keeps both sides."""
    if device == "cpu" and case.dtype == "bfloat16" and plan.mode != "quick" and not machine.native_bfloat16(cpu_flags):
        return (f"skipped: this CPU has none of {', '.join(machine.NATIVE_BF16_FLAGS)}, so PyTorch's bfloat16 "
                "autocast would be emulated, many times slower than float32")
    return None


def run_backbone(plan: Plan, device: str, threads: int, torch_skip_reason: str | None) -> dict:
    rows, torch_rows = [], {}
    flags = machine.cpu_flags()
    for case in plan.cases:
        spec = backbone_spec(plan, case, device, threads)
        log(f"backbone {case.name}: JAX")
        jax_row = _framework_row(call_worker("jax", dict(spec, xla_flags=plan.jax_xla_flags)))
        skip = torch_skip_reason or pytorch_skip_reason(plan, case, device, flags)
        if skip:
            torch_row = dict(error=skip)
        elif case.pytorch_case in torch_rows:  # a JAX-only variant of a case PyTorch has run
            torch_row = torch_rows[case.pytorch_case]
        else:
            log(f"backbone {case.name}: PyTorch")
            torch_spec = backbone_spec(plan, case.pytorch_case, device, threads)
            torch_row = torch_rows[case.pytorch_case] = _framework_row(call_worker("pytorch", torch_spec))
        rows.append(dict(name=case.name, case=dataclasses.asdict(case), jax=jax_row, pytorch=torch_row,
                         comparison=cases_lib.compare(case, jax_row, torch_row)))
    return dict(device=device, threads=threads, unet=plan.unet, cases=rows)


def run_compiled(plan: Plan, threads: int) -> dict:
    """The compile-only jobs, `parallel` worker processes at a time (XLA compiles a program on one thread), then
    joined into the cost and memory sections."""
    job_list = compiled_jobs.jobs(plan.compiled)
    parallel = max(1, min(threads, plan.compile_parallel, len(job_list)))
    log(f"compiled: {len(job_list)} jobs, {parallel} at a time")

    def one(job: dict) -> dict:
        what = job["job"] if job["job"] == "programs" else f"train step {job['key']}"
        log(f"compiled: {what}")
        result = call_worker("compiled", dict(job, threads=threads))
        log(f"compiled: {what} done in {result.get('worker_s', 0):.0f} s{' (failed)' if 'error' in result else ''}")
        return result

    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(one, job_list))
    return dict(compiled_jobs.assemble(plan.compiled, results), parallel_jobs=parallel,
                jobs=[dict(job, **{k: r[k] for k in ("worker_s", "peak_rss_bytes", "error") if k in r})
                      for job, r in zip(job_list, results)])


def accelerator_check(threads: int) -> str | None:
    """For --device: exits unless JAX's default backend is a GPU or TPU; the reason to skip PyTorch (no CUDA)."""
    probe = call_worker("probe", dict(threads=threads))
    if "error" in probe:
        sys.exit(f"--device: could not look for an accelerator: {probe['error']}")
    if probe["jax_backend"] == "cpu":
        sys.exit("--device: no accelerator found: JAX's default backend is the CPU "
                 f"(devices {probe['jax_devices']}) and torch.cuda.is_available() is {probe['torch_cuda']}. "
                 "Run without --device to benchmark on the CPU.")
    log(f"accelerator: JAX {probe['jax_backend']} {probe['jax_devices']}, PyTorch CUDA {probe['torch_device']}")
    return None if probe["torch_cuda"] else f"skipped: PyTorch sees no CUDA device (JAX runs on {probe['jax_backend']})"


def _previous(path: str, mode: str, device: str) -> dict:
    """The parts of an earlier run of the same mode and device in `path`, to keep beside an `--only` run."""
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return {}
    return old.get("parts", {}) if (old.get("mode"), old.get("device")) == (mode, device) else {}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny UNet, for tests: checks the harness, times mean "
                                                           "nothing")
    size.add_argument("--full", action="store_true", help="the issue's whole grid (hours on a 2-core CPU)")
    parser.add_argument("--device", action="store_true", help="the backbone comparison on the accelerator (JAX's "
                                                              "default backend, PyTorch CUDA)")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run")
    parser.add_argument("--output", help="folder for results.json and BENCHMARKS.md (default: bench/results.json "
                                         "and BENCHMARKS.md at the repository root)")
    args = parser.parse_args(argv)
    plan = make_plan("quick" if args.quick else "full" if args.full else "default")
    threads = len(machine.available_cpus())
    device = "accelerator" if args.device else "cpu"
    torch_skip_reason = accelerator_check(threads) if args.device and "backbone" in args.only else None
    results_path = os.path.join(args.output or os.path.join(REPO, "bench"), "results.json")
    report_path = os.path.join(args.output or REPO, "BENCHMARKS.md")

    runners = {
        "backbone": lambda: run_backbone(plan, device, threads, torch_skip_reason),
        "compiled": lambda: run_compiled(plan, threads),
        "input": lambda: call_worker("input", dict(plan.input, threads=threads)),
    }
    description = machine.describe()
    parts = _previous(results_path, plan.mode, device)
    for name in PARTS:
        if name in args.only:
            log(f"part {name} ({plan.mode})")
            started, code, load = machine.now(), machine.code_version(REPO), machine.load_average()
            start = time.perf_counter()
            parts[name] = dict(runners[name](), started=started, code=code,
                               machine=machine.fingerprint(description), load_average_at_start=load,
                               load_average_at_end=machine.load_average(), elapsed_s=time.perf_counter() - start)
            log(f"part {name} done in {parts[name]['elapsed_s']:.0f} s")
    command = " ".join(["python -m bench.run", *(sys.argv[1:] if argv is None else argv)])
    results = dict(mode=plan.mode, device=device, command=command, machine=description,
                   results_file=os.path.relpath(results_path, os.path.dirname(report_path)), parts=parts)
    os.makedirs(os.path.dirname(results_path), exist_ok=True)
    os.makedirs(os.path.dirname(report_path), exist_ok=True)
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)
    text = report.render(results)
    with open(report_path, "w") as f:
        f.write(text)
    print(text)
    log(f"wrote {results_path} and {report_path}")


if __name__ == "__main__":
    main()

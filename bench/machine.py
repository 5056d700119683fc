"""Facts about the machine and the process: description for the report, CPU pinning, peak-RSS readings.

Peak RSS per measurement: Linux keeps the process's resident high-water mark in /proc/self/status (VmHWM), and
writing "5" to /proc/self/clear_refs resets it to the current RSS (Linux >= 4.0). So one process can measure
several cases, each with its own peak, as long as it resets before each case. Where the reset is not allowed,
the readings are the process-wide high-water mark and say so (`resettable` False).
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata

LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "diffusers", "tensorflow", "psutil")


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def thread_env(threads: int) -> dict[str, str]:
    """Environment for a worker that may use `threads` threads (OpenMP / MKL pools in torch, Eigen in TF)."""
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def pin_to_cpus(threads: int) -> None:
    """Restrict the calling process to the first `threads` available CPUs (bench/worker.py, before any import).

    XLA:CPU sizes its intra-op thread pool from the CPUs the process may run on, and torch gets
    `torch.set_num_threads(threads)` in its worker, so both frameworks use the same cores.
    """
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(available_cpus()[:threads]))


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS; False when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU features that decide the benchmarks' speed, of those /proc/cpuinfo lists."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in flags]
    except OSError:
        pass
    return []


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bfloat16(flags: list[str]) -> bool:
    """Whether a CPU with these flags computes bfloat16 matmuls natively; without it PyTorch's autocast emulates
    them, many times slower than float32 (README, "Speed and memory")."""
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def _total_ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def code_version(repo: str) -> str:
    """The commit `repo` is at, with '+ uncommitted changes' when the tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=60)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def fingerprint(description: dict) -> str:
    """What identifies the machine of a `describe()` for comparing runs: CPU model and flags, CPUs available, RAM."""
    ram = description.get("ram_bytes")
    cpu = f"{description['cpu_model']} ({', '.join(description['cpu_flags'])})"
    return f"{cpu}, {description['available_cpus']} CPUs available" + (f", {ram / 2 ** 30:.0f} GiB RAM" if ram else "")


def describe() -> dict:
    """The machine, as the report's header shows it. Imports no framework (safe in the orchestrating process)."""
    return dict(
        date=now(),
        platform=platform.platform(),
        cpu_model=_cpu_model(),
        cpu_flags=cpu_flags(),
        logical_cpus=os.cpu_count(),
        available_cpus=len(available_cpus()),
        ram_bytes=_total_ram_bytes(),
        load_average=load_average(),
        versions=versions(),
    )

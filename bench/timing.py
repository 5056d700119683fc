"""Timing and peak memory of one benchmark case, the same way for every framework.

`run_case` calls `step` `warmup` times untimed (first-call costs: compilation in JAX, allocator and kernel
selection in PyTorch), then `reps` times timed. `step` must return only when its work is finished (JAX:
block_until_ready; CUDA: synchronize). Wall-clock and process CPU time are both kept: on a machine shared with
other jobs the wall time stretches with the load, the CPU time much less.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

from bench import machine


def run_case(step: Callable[[], None], warmup: int, reps: int) -> dict:
    """{'wall_s': [...], 'cpu_s': [...], 'median_wall_s', 'median_cpu_s', 'peak_rss_bytes', 'rss_before_bytes'}.

    The peak RSS covers warm-up and timed calls (the high-water mark is reset first when the kernel allows).
    """
    resettable = machine.reset_peak_rss()
    rss_before = machine.rss_bytes()
    for _ in range(warmup):
        step()
    walls, cpus = [], []
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return dict(wall_s=walls, cpu_s=cpus, median_wall_s=statistics.median(walls),
                median_cpu_s=statistics.median(cpus), rss_before_bytes=rss_before,
                peak_rss_bytes=machine.peak_rss_bytes(), peak_rss_resettable=resettable)

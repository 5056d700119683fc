"""`--cpu-report=FILE`: the CPU seconds of every test, for finding where a 2-core machine's suite time goes.

Each test (setup, call and teardown) appends one JSON line to FILE: its wall time, the CPU time of the process
that ran it (all its threads: XLA compiles and runs there) and that of the subprocesses it waited for
(getrusage's RUSAGE_CHILDREN: a subprocess counts when it is waited for, so a module's background runs land on
the test that waits for them). The process that started the session (the pytest-xdist controller under
`make test`) empties FILE at the start and prints the sums per test file at the end. Imported by
tests/conftest.py.
"""
from __future__ import annotations

import collections
import json
import resource
import time

import pytest


def pytest_addoption(parser):
    parser.addoption("--cpu-report", metavar="FILE", help="write each test's CPU seconds (its process's and its "
                                                          "subprocesses') to FILE and sum them per file at the end")


def _is_xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config):
    path = config.getoption("--cpu-report")
    if path and not _is_xdist_worker(config):
        open(path, "w").close()


def _cpu_seconds() -> tuple[float, float]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    path = item.config.getoption("--cpu-report")
    if not path:
        yield
        return
    (own, children), start = _cpu_seconds(), time.perf_counter()
    yield
    (own_end, children_end), end = _cpu_seconds(), time.perf_counter()
    line = dict(test=item.nodeid, wall_s=round(end - start, 3), cpu_s=round(own_end - own, 3),
                subprocess_cpu_s=round(children_end - children, 3))
    with open(path, "a") as f:  # one short line per write: lines from the workers do not interleave
        f.write(json.dumps(line) + "\n")


def per_file(path: str) -> dict[str, dict[str, float]]:
    """Test file -> summed wall_s, cpu_s, subprocess_cpu_s and the number of tests, from a report."""
    sums: dict = collections.defaultdict(lambda: dict(tests=0, wall_s=0.0, cpu_s=0.0, subprocess_cpu_s=0.0))
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            entry = sums[row["test"].split("::")[0]]
            entry["tests"] += 1
            for key in ("wall_s", "cpu_s", "subprocess_cpu_s"):
                entry[key] += row[key]
    return dict(sums)


def pytest_terminal_summary(terminalreporter, config):
    path = config.getoption("--cpu-report")
    if not path or _is_xdist_worker(config):
        return
    sums = per_file(path)
    total = sum(s["cpu_s"] + s["subprocess_cpu_s"] for s in sums.values())
    terminalreporter.write_sep("=", f"CPU seconds per test file ({total:.0f} in all; each test's in {path})")
    for name, s in sorted(sums.items(), key=lambda item: -(item[1]["cpu_s"] + item[1]["subprocess_cpu_s"])):
        terminalreporter.write_line(f"{s['cpu_s'] + s['subprocess_cpu_s']:8.0f}  (subprocesses "
                                    f"{s['subprocess_cpu_s']:6.0f}, wall {s['wall_s']:6.0f}, {s['tests']:3d} tests)  "
                                    f"{name}")

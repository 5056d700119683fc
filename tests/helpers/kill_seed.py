"""Seeds of the kill-and-resume tests: where a run is killed is drawn from a seed that VPD_KILL_SEED sets, or from a
fresh one otherwise; the test prints it, so a failing kill point can be replayed (VPD_KILL_SEED=<seed> pytest ...)."""
from __future__ import annotations

import os
import random

ENV = "VPD_KILL_SEED"


def kill_seed() -> int:
    """VPD_KILL_SEED, or a fresh random seed."""
    value = os.environ.get(ENV, "")
    if value:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{ENV}={value!r} is not an integer seed") from None
    return random.SystemRandom().randrange(100_000)


def describe(seed: int) -> str:
    """What to prefix a failure message with: the seed and how to replay it."""
    return f"{ENV}={seed} (set it to replay this kill point)"

"""Checks shared by the augmentation config dataclasses; each error names the class, field and value."""


def check_probabilities(cfg, *names: str) -> None:
    for name in names:
        p = getattr(cfg, name)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a probability in [0, 1], got {p}")


def check_ordered_pair(cfg, name: str, low: float) -> None:
    value = getattr(cfg, name)
    if len(value) != 2 or not low <= value[0] <= value[1]:
        raise ValueError(f"{type(cfg).__name__}.{name} must be an ordered pair (lo, hi) with {low} <= lo <= hi, "
                         f"got {value!r}")


def check_positive_pair(cfg, name: str) -> None:
    value = getattr(cfg, name)
    if len(value) != 2 or min(value) <= 0:
        raise ValueError(f"{type(cfg).__name__}.{name} must be a pair of positive numbers, got {value!r}")


def check_non_negative(cfg, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be >= 0, got {getattr(cfg, name)}")

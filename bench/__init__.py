"""Benchmarks (issue 8): `python -m bench.run` measures and rewrites BENCHMARKS.md and bench/results.json."""

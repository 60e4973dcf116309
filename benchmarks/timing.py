"""Timing shared by the benchmark scripts (imported as ``timing``: scripts run from this folder)."""

from __future__ import annotations

import statistics
import time

import jax


def median_ms(functions, args, reps: int) -> list[float]:
    """Median latency (ms) of each function on ``args``, after one warm-up call each, timed
    interleaved (so drift in the machine's speed hits every function alike)."""
    for f in functions:
        jax.block_until_ready(f(*args))
    times = [[] for _ in functions]
    for _ in range(reps):
        for f, t in zip(functions, times, strict=True):
            begin = time.perf_counter()
            jax.block_until_ready(f(*args))
            t.append((time.perf_counter() - begin) * 1e3)
    return [statistics.median(t) for t in times]

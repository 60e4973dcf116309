"""How close two float32 evaluations of one accumulated quantity must be, on any machine."""

from __future__ import annotations

import numpy as np

ACCUMULATED_RTOL = 1e-4
"""The bound of :func:`assert_close_accumulated`, relative to the compared values' magnitude."""


def assert_close_accumulated(
    actual, expected, err_msg: str = "", rtol: float = ACCUMULATED_RTOL
) -> None:
    """Asserts ``|actual - expected| <= rtol · max(1, max |expected|)``, elementwise.

    A caller may tighten ``rtol`` for a model small enough that rounding, which adds like a
    random walk (``~√n·ε`` a reduction, below), stays far inside it: e.g. 1e-5 for one layer
    whose longest reductions (over a few hundred tokens) give ~2e-6.

    For quantities float32 accumulates (log-likelihoods summed over tokens, losses, logits after
    several layers) computed by two programs that order the sums differently: batched vs single
    forwards, with vs without a KV cache, gaze with every region vs dense, sharded vs not, or
    another XLA:CPU build on another processor (issue 17: 2.4e-4 at magnitude 18). An absolute
    bound on them holds on one machine only. The bound:

    - a float32 sum of ``n`` terms, in any order, is within ``(n - 1)·ε·Σ|terms|`` of the exact
      sum (``ε = 2^-23 ≈ 1.2e-7``; Higham, *Accuracy and Stability of Numerical Algorithms*,
      §4.2), so two orders differ by at most ``2n·ε`` times the terms' magnitude; 1e-4 is that
      worst case for ``n = 420``, longer than the reductions of the tiny models compared here
      (hidden sizes, sequence lengths and summed tokens of at most a few hundred);
    - errors of several layers add up, but rounding is not adversarial: it adds like a random
      walk, ``~√n·ε`` a reduction, and the worst case of one reduction covers several layers of
      it (issue 17's 1.3e-5 relative is 8x inside);
    - the scale is the largest compared magnitude, at least 1: every layer's reductions run
      over RMS-normalised, unit-scale terms, so a small value has the absolute error of its
      layer's terms, not a fraction of itself.
    """
    actual, expected = (np.asarray(x, np.float64) for x in (actual, expected))
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale, err_msg=err_msg)

"""The bound on accumulated float32 quantities holds where issue 17's machine differed, and
still fails a difference a bug makes."""

from __future__ import annotations

import pytest

from tests.tolerances import assert_close_accumulated


def test_issue_17s_machine_passes_and_a_real_difference_fails():
    # Summed option log-likelihoods of magnitude ~18, batched vs single forward: 2.4e-4 apart
    # on one processor, under atol=1e-4 (the old bound) only on others.
    assert_close_accumulated([-18.2, -6.1], [-18.2 + 2.4e-4, -6.1])
    with pytest.raises(AssertionError):  # e.g. one more token scored, or a region missed
        assert_close_accumulated([-18.2, -6.1], [-18.2 + 5e-3, -6.1])
    assert_close_accumulated([0.0, 0.5], [0.0, 0.5 + 9e-5])  # small values: the floor of 1

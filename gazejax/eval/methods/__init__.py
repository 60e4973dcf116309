"""The evaluation methods, all with the checkpoint's weights: one module per method, registered
once in :data:`METHODS`.

**Budget.** A budget ``f`` is the fraction of a sample's visual KV entries that one answer query
may read (0.22: 22 % of the 36 visual tokens of an image, or of the 144 of a 4-frame video).
Context tokens (``|C|`` per unit, gaze checkpoints only) are read by every method and reported
separately (``context_kv``); ``kv_size`` = visual + context entries, as in the paper's sec. 3.5.
A method that takes a budget runs once per budget; the others once. ``blind`` reads no visual
or context entry at all: the score of the question alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from gazejax.eval.methods.base import Method, Runner
from gazejax.eval.methods.blind import Blind
from gazejax.eval.methods.dense import Dense
from gazejax.eval.methods.dense_reduced import DenseReduced
from gazejax.eval.methods.evict_question import EvictQuestion
from gazejax.eval.methods.gaze import Gaze
from gazejax.eval.methods.token_compression import TokenCompression

METHODS: dict[str, type[Method]] = {
    method.name: method
    for method in (Dense, Gaze, DenseReduced, EvictQuestion, TokenCompression, Blind)
}
"""Name -> method class, in the order of the command line's help and the notes."""
DEFAULT_BUDGETS = (0.11, 0.22, 0.44)


def make_method(name: str, budget: float | None = None) -> Method:
    """The method ``name`` at ``budget`` (None for a method without one).

    Raises:
      ValueError: an unknown name.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name](budget)


def parse_methods(names: Sequence[str], budgets: Sequence[float]) -> list[Method]:
    """Each method that takes a budget at every budget, the others once, in ``names``' order.

    Raises:
      ValueError: an unknown name, or a budget outside ``(0, 1]``.
    """
    out = []
    for name in names:
        method = make_method(name)
        if method.takes_budget:
            out.extend(make_method(name, float(b)) for b in budgets)
        else:
            out.append(method)
    for b in budgets:
        if not 0 < b <= 1:
            raise ValueError(f"budgets are fractions in (0, 1], got {b}")
    return out


__all__ = ["DEFAULT_BUDGETS", "METHODS", "Method", "Runner", "make_method", "parse_methods"]

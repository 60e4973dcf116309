"""The benchmark sources: one module per source, registered once in :data:`SOURCES`.

A ``--benchmarks`` spec is ``KIND`` or ``KIND:ARGUMENT`` (``synthetic``,
``jsonl:PATH[:NAME]``); ``KIND`` picks the source, whose ``load(spec, options)`` returns a
:class:`~gazejax.eval.benchmarks.base.Benchmark` (validated before any method runs).
"""

from __future__ import annotations

from types import ModuleType

from gazejax.eval.benchmarks import jsonl, synthetic
from gazejax.eval.benchmarks.base import Benchmark, LoadOptions

SOURCES: dict[str, ModuleType] = {"synthetic": synthetic, "jsonl": jsonl}
"""Spec kind -> source module (its ``USAGE`` and ``load``)."""


def load_benchmark(spec: str, options: LoadOptions) -> Benchmark:
    """The benchmark of a ``--benchmarks`` entry.

    Raises:
      ValueError: an unknown kind or a malformed spec; DataError: a bad file or line.
    """
    source = SOURCES.get(spec.partition(":")[0])
    if source is None:
        known = ", ".join(s.USAGE for s in SOURCES.values())
        raise ValueError(f"unknown benchmark {spec!r}; known: {known}")
    return source.load(spec, options)


__all__ = ["SOURCES", "Benchmark", "LoadOptions", "load_benchmark"]

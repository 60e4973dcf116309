"""Evaluation: a jitted sweep over methods × KV budgets × benchmarks (``python -m
gazejax.evaluate`` is its command line).

- :mod:`~gazejax.eval.methods`: the methods, one module each, registered in ``METHODS``.
- :mod:`~gazejax.eval.benchmarks`: the benchmark sources, one module each, in ``SOURCES``.
- :mod:`~gazejax.eval.scoring`: teacher-forced scores and the ``results.json`` record.
- :mod:`~gazejax.eval.sweep`: every method on every benchmark.
- :mod:`~gazejax.eval.reports`: ``results.json``, the Markdown tables and the plot.
"""

"""Scoring, the same for every method: one teacher-forced forward of the whole conversation,
and an answer counts when the argmax of every answer token (and of the closing ``<|im_end|>``)
is right (:func:`gazejax.losses.answer_exact_match`); its summed log-probability
(:func:`gazejax.losses.answer_loglik`) ranks the options of a multiple-choice question. Each
(method, budget, bucket shape) compiles once. The *answer queries* are the slots that carry a
target: the last prompt token (``assistant\\n``, which predicts the first answer token) and the
answer tokens.

A record of ``results.json`` (DESIGN.md §6) reports the score beside the KV entries one answer
query reads: ``visual_kv`` (by the method), ``context_kv`` (``|C|`` per unit), ``kv_size`` =
visual + context, ``dense_kv_size`` (every visual token of the uncompressed grid), and their
fractions, overall and per family.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from gazejax.eval.methods.base import Runner
from gazejax.losses import answer_exact_match, answer_loglik

FAMILIES = ("single_region", "multi_region", "counting", "video")
"""The synthetic set's task families, in report order (first in every ``by_family``)."""
SCORING = (
    "teacher-forced argmax of every answer token (gazejax.losses.answer_exact_match); "
    "answer queries = slots with a target"
)
"""``results.json``'s ``scoring``."""


def jitted_scores(runner: Runner) -> Callable:
    """``(params, inputs, targets, top_k) -> (exact bool [batch], loglik float32 [batch])``,
    jitted (``top_k`` static)."""

    def scores(params, inputs, targets, top_k):
        logits = runner.logits(params, inputs, targets, top_k)
        return answer_exact_match(logits, targets), answer_loglik(logits, targets)

    return jax.jit(scores, static_argnums=(3,))


def summarize(exact, visual, context, dense) -> dict:
    """Score and KV sizes of per-example arrays (``[n]`` each)."""
    exact, visual, context, dense = (
        np.asarray(x, np.float64) for x in (exact, visual, context, dense)
    )
    dense_safe = np.maximum(dense, 1.0)
    return {
        "score": float(exact.mean()) if len(exact) else float("nan"),
        "num_examples": int(len(exact)),
        "visual_kv": float(visual.mean()),
        "context_kv": float(context.mean()),
        "kv_size": float((visual + context).mean()),
        "dense_kv_size": float(dense.mean()),
        "visual_kv_fraction": float((visual / dense_safe).mean()),
        "kv_fraction": float(((visual + context) / dense_safe).mean()),
    }


def record(runner: Runner, results: dict, benchmark: str) -> dict:
    """One results.json record (DESIGN.md §6 keys, then the breakdowns) of the per-example
    ``results`` of :func:`gazejax.eval.sweep.run_method`."""
    method = runner.method
    arrays = [np.asarray(results[k]) for k in ("exact", "visual_kv", "context_kv", "dense_kv")]
    overall = summarize(*arrays)
    family = np.asarray(results["family"])
    task = np.asarray(results["task"])
    top_k = results["top_k"]
    if len(set(top_k.values())) == 1:
        top_k = next(iter(top_k.values()))
    return {
        "method": method.name,
        "budget": method.budget,
        "label": method.label,
        "top_k": top_k or None,
        "kv_size": overall["kv_size"],
        "dense_kv_size": overall["dense_kv_size"],
        "benchmark": benchmark,
        "metric": "exact_match",
        "score": overall["score"],
        "num_examples": overall["num_examples"],
        "kv_fraction": overall["kv_fraction"],
        "visual_kv_fraction": overall["visual_kv_fraction"],
        "visual_kv": overall["visual_kv"],
        "context_kv": overall["context_kv"],
        "seconds": round(results["seconds"], 3),
        "by_family": {
            f: summarize(*(a[family == f] for a in arrays))
            for f in [*FAMILIES, *sorted(set(family) - set(FAMILIES))]
            if (family == f).any()
        },
        "by_task": {
            t: {"score": float(arrays[0][task == t].mean()), "num_examples": int((task == t).sum())}
            for t in dict.fromkeys(task)
        },
        **runner.details,
    }

"""Scoring, the same for every method: one teacher-forced forward of the whole conversation,
and an answer counts when the argmax of every answer token (and of the closing ``<|im_end|>``)
is right (:func:`gazejax.losses.answer_exact_match`); its summed log-probability
(:func:`gazejax.losses.answer_loglik`) ranks the options of a multiple-choice question. Each
(method, budget, bucket shape) compiles once. The *answer queries* are the slots that carry a
target: the last prompt token (``assistant\\n``, which predicts the first answer token) and the
answer tokens. A conversation's answers (turns) are the runs of consecutive answer queries,
each scored on its own (:func:`gazejax.losses.answer_turns`), with the earlier turns, questions
and reference answers, in context: the model's teacher-forced answers.

A record of ``results.json`` (DESIGN.md §6) reports the score beside the KV entries one answer
query reads: ``visual_kv`` (by the method), ``context_kv`` (``|C|`` per unit), ``kv_size`` =
visual + context, ``dense_kv_size`` (every visual token of the uncompressed grid), and their
fractions, overall, per family and per turn (1 = the first answer), each score with its
standard error ``sqrt(p (1 - p) / n)`` over its ``n`` answers (``stderr``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from gazejax.eval.methods.base import Runner
from gazejax.losses import turn_scores

FAMILIES = ("single_region", "multi_region", "counting", "video")
"""The synthetic set's task families, in report order (first in every ``by_family``)."""
SCORING = (
    "teacher-forced argmax of every answer token (gazejax.losses.answer_exact_match); "
    "answer queries = slots with a target; each answer of a conversation scored on its own, "
    "the earlier turns (reference answers) in context"
)
"""``results.json``'s ``scoring``."""


def jitted_scores(runner: Runner) -> Callable:
    """``(params, inputs, targets, top_k, turns) -> (exact, loglik, answered)`` of
    :func:`gazejax.losses.turn_scores`, jitted (``top_k`` and ``turns`` static)."""

    def scores(params, inputs, targets, top_k, turns):
        return turn_scores(runner.logits(params, inputs, targets, top_k), targets, turns)

    return jax.jit(scores, static_argnums=(3, 4))


def summarize(exact, visual, context, dense) -> dict:
    """Score, its standard error and KV sizes of per-answer arrays (``[n]`` each)."""
    exact, visual, context, dense = (
        np.asarray(x, np.float64) for x in (exact, visual, context, dense)
    )
    dense_safe = np.maximum(dense, 1.0)
    score = float(exact.mean()) if len(exact) else float("nan")
    return {
        "score": score,
        "stderr": float(np.sqrt(score * (1 - score) / max(len(exact), 1))),
        "num_examples": int(len(exact)),
        "visual_kv": float(visual.mean()),
        "context_kv": float(context.mean()),
        "kv_size": float((visual + context).mean()),
        "dense_kv_size": float(dense.mean()),
        "visual_kv_fraction": float((visual / dense_safe).mean()),
        "kv_fraction": float(((visual + context) / dense_safe).mean()),
    }


def _by_family(arrays: list[np.ndarray], family: np.ndarray, chosen: np.ndarray) -> dict:
    """:func:`summarize` of the ``chosen`` answers per family (report order, then the rest)."""
    families = [*FAMILIES, *sorted(set(family.tolist()) - set(FAMILIES))]
    return {
        f: summarize(*(a[chosen & (family == f)] for a in arrays))
        for f in families
        if (chosen & (family == f)).any()
    }


def breakdowns(arrays: list[np.ndarray], family: np.ndarray, turn: np.ndarray) -> dict:
    """The breakdowns of per-answer ``arrays`` (exact, visual, context, dense KV; ``[n]``
    each): ``by_family``, ``by_turn`` (``"1"``, ``"2"``, ...: each with its families) and, in
    conversations, ``later_turns`` (every turn after the first), each :func:`summarize`d."""
    return {
        "by_family": _by_family(arrays, family, np.ones(len(family), bool)),
        "by_turn": {
            str(t): {
                **summarize(*(a[turn == t] for a in arrays)),
                "by_family": _by_family(arrays, family, turn == t),
            }
            for t in sorted(set(turn.tolist()))
        },
        **(
            {
                "later_turns": {
                    **summarize(*(a[turn > 1] for a in arrays)),
                    "by_family": _by_family(arrays, family, turn > 1),
                }
            }
            if (turn > 1).any()
            else {}
        ),
    }


def record(runner: Runner, results: dict, benchmark: str) -> dict:
    """One results.json record (DESIGN.md §6 keys, then the breakdowns: ``by_family``,
    ``by_turn`` (``"1"``, ``"2"``, ...) and, in conversations, ``later_turns`` (every turn
    after the first) each with its families, ``by_task``) of the per-answer
    ``results`` of :func:`gazejax.eval.sweep.run_method`."""
    method = runner.method
    arrays = [np.asarray(results[k]) for k in ("exact", "visual_kv", "context_kv", "dense_kv")]
    task = np.asarray(results["task"])
    overall = summarize(*arrays)
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
        "stderr": overall["stderr"],
        "num_examples": overall["num_examples"],
        "kv_fraction": overall["kv_fraction"],
        "visual_kv_fraction": overall["visual_kv_fraction"],
        "visual_kv": overall["visual_kv"],
        "context_kv": overall["context_kv"],
        "seconds": round(results["seconds"], 3),
        **breakdowns(arrays, np.asarray(results["family"]), np.asarray(results["turn"])),
        "by_task": {
            t: {"score": float(arrays[0][task == t].mean()), "num_examples": int((task == t).sum())}
            for t in dict.fromkeys(task)
        },
        **runner.details,
    }

"""Losses and answer scores on teacher-forced logits, shared by training and evaluation.

Every function reads ``logits`` float ``[batch, length, vocab]`` (the prediction at each slot)
and ``targets`` int32 ``[batch, length]`` (the next token, ``-1`` where a slot has no target).
(:mod:`gazejax.metrics` is something else: the writer of training metrics to the console,
``metrics.jsonl`` and TensorBoard.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, dict]:
    """Mean next-token loss over slots with a target (``targets >= 0``), and token accuracy.

    Returns:
      ``(loss, {"loss_sum", "correct", "tokens"})`` (sums, for exact averaging over micro-batches).
    """
    weights = (targets >= 0).astype(jnp.float32)
    safe = jnp.maximum(targets, 0)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), safe[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == safe).astype(jnp.float32) * weights
    sums = {"loss_sum": (nll * weights).sum(), "correct": correct.sum(), "tokens": weights.sum()}
    return sums["loss_sum"] / jnp.maximum(sums["tokens"], 1.0), sums


def answer_exact_match(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """bool ``[batch]``: every supervised token is predicted (greedy decoding would produce the
    whole answer), for samples that have a target."""
    wrong = (jnp.argmax(logits, axis=-1) != targets) & (targets >= 0)
    return ~wrong.any(axis=-1) & (targets >= 0).any(axis=-1)


def answer_loglik(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """float32 ``[batch]``: the summed log-probability of the supervised tokens (the targets)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(targets >= 0, picked, 0.0).sum(-1)


def answer_turns(targets: jax.Array) -> jax.Array:
    """int32 ``[batch, length]``: which answer (0 = the first) a slot's target belongs to, -1
    where there is none. An answer is a run of consecutive slots with a target; the template
    puts unsupervised slots between two answers (the ``\\n`` after ``<|im_end|>``, the next
    question)."""
    supervised = targets >= 0
    starts = supervised & ~jnp.pad(supervised[:, :-1], ((0, 0), (1, 0)))
    return jnp.where(supervised, jnp.cumsum(starts, axis=-1, dtype=jnp.int32) - 1, -1)


def turn_scores(
    logits: jax.Array, targets: jax.Array, turns: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each of the first ``turns`` answers (:func:`answer_turns`) scored on its own.

    Returns:
      ``exact`` bool ``[batch, turns]`` (:func:`answer_exact_match` of that answer), ``loglik``
      float32 ``[batch, turns]`` (:func:`answer_loglik`), and ``answered`` bool ``[batch,
      turns + 1]``: the sample has that answer (the last column: more than ``turns``).
    """
    turn = answer_turns(targets)
    exact, loglik, answered = [], [], []
    for t in range(turns):
        chosen = jnp.where(turn == t, targets, -1)
        exact.append(answer_exact_match(logits, chosen))
        loglik.append(answer_loglik(logits, chosen))
        answered.append((turn == t).any(-1))
    answered.append((turn >= turns).any(-1))
    return jnp.stack(exact, -1), jnp.stack(loglik, -1), jnp.stack(answered, -1)

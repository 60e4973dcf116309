"""Choosing the next token from logits: greedy, temperature and nucleus (top-p) sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_next_token(
    logits: jax.Array, rng: jax.Array | None, temperature: float = 0.0, top_p: float = 1.0
) -> jax.Array:
    """Picks the next token from float ``logits [batch, vocab]``; returns int32 ``[batch]``.

    ``temperature == 0`` is greedy (argmax, lowest id on ties). Otherwise the logits are divided by
    ``temperature`` and, with ``top_p < 1``, restricted to the smallest set of most probable
    tokens whose probability reaches ``top_p`` (nucleus sampling; the top token is always kept).
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng key")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = mass_before < top_p
        threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)

"""Autoregressive decoding with the KV cache: prefill once, then one jitted step per token.

big_vision/PaliGemma style: a Python loop over two jitted functions (prefill and extend), easy to
debug and to stop at end-of-sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gazejax.models.decoder import Decoder, KVCache


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


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _extend(model: Decoder, params, input_ids, positions, input_mask, cache: KVCache):
    """Runs ``input_ids [batch, seq]`` against the cache; returns last logits and the cache."""
    logits, cache = model.apply(
        {"params": params}, input_ids, positions, input_mask=input_mask, cache=cache
    )
    return logits[:, -1], cache


def generate(
    model: Decoder,
    params,
    prompt_ids: jax.Array,
    max_new_tokens: int,
    *,
    prompt_mask: jax.Array | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
) -> jax.Array:
    """Generates ``max_new_tokens`` after each prompt.

    Args:
      model, params: a :class:`Decoder` and its parameters.
      prompt_ids: int ``[batch, prompt_len]``, **left**-padded when lengths differ.
      max_new_tokens: number of tokens to generate.
      prompt_mask: bool ``[batch, prompt_len]``, False on the left padding; default all True.
      temperature, top_p: see :func:`sample_next_token`; 0 means greedy.
      rng: PRNG key, needed when sampling.
      eos_id: once a sample emits it, the sample's later tokens are ``eos_id``; the loop stops
        early when every sample has finished.

    Returns:
      int32 ``[batch, max_new_tokens]``.
    """
    batch, prompt_len = prompt_ids.shape
    prompt_mask = (
        jnp.ones((batch, prompt_len), bool) if prompt_mask is None else prompt_mask.astype(bool)
    )
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    cache = KVCache.empty(model.config, batch, prompt_len + max_new_tokens)
    logits, cache = _extend(
        model, params, prompt_ids.astype(jnp.int32), positions, prompt_mask, cache
    )
    next_position = positions[:, -1:] + 1
    finished = jnp.zeros((batch,), bool)
    tokens = []
    for step in range(max_new_tokens):
        step_rng = None if rng is None else jax.random.fold_in(rng, step)
        token = sample_next_token(logits, step_rng, temperature, top_p)
        if eos_id is not None:
            token = jnp.where(finished, eos_id, token)
            finished = finished | (token == eos_id)
        tokens.append(token)
        if step + 1 == max_new_tokens or (eos_id is not None and bool(finished.all())):
            break
        logits, cache = _extend(
            model, params, token[:, None], next_position, jnp.ones((batch, 1), bool), cache
        )
        next_position = next_position + 1
    out = jnp.stack(tokens, axis=1)
    if out.shape[1] < max_new_tokens:
        out = jnp.pad(out, ((0, 0), (0, max_new_tokens - out.shape[1])), constant_values=eos_id)
    return out

"""The dense decode steps the benchmark scripts time gaze against (imported as
``dense_reference``: scripts run from this folder).

The cache is the decoder's, head-major ``[b, kv_heads, slots, d]`` with ``cache["filled"]``
slots written (``gazejax.models.decoder.cache_slots`` rounds the allocation up; the tail is
padding, masked); cuDNN takes its own layout, ``cache["length_major"]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filled_slots(key: jax.Array, cache: dict) -> jax.Array:
    """bool ``[slots]``: the slots of a head-major ``key`` that hold tokens."""
    return jnp.arange(key.shape[2]) < cache["filled"]


def dense_decode(query, key, value, cache):
    """``[b, 1, h, d]`` query over every written slot of the head-major ``[b, kv_heads, slots,
    d]`` cache: einsum, softmax, einsum."""
    batch, _, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    q = query[:, 0].reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("bkgd,bkld->bkgl", q, key, preferred_element_type=jnp.float32)
    logits = jnp.where(filled_slots(key, cache), logits * head_dim**-0.5, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgl,bkld->bkgd", probs, value, preferred_element_type=jnp.float32)
    return out.reshape(query.shape).astype(query.dtype)


def cudnn_decode(query, key, value, cache):
    """The same step through cuDNN's fused attention (GPU only; GQA by head broadcast), on the
    length-major copy of the cache (cuDNN's layout) and the written length."""
    del key, value
    keys, values = cache["length_major"]
    filled = jnp.reshape(cache["filled"], (1,)).astype(jnp.int32)
    return jax.nn.dot_product_attention(
        query, keys, values, key_value_seq_lengths=filled, implementation="cudnn"
    )

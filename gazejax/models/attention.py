"""Dense grouped-query attention and rotary position embedding, shared by the models."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.gaze_attention import TokenMeta, blockwise, visibility


def dense_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array,
    scale: float | None = None,
) -> jax.Array:
    """Masked softmax attention with grouped-query heads; scores and softmax in float32.

    Args:
      query: ``[batch, q_len, num_heads, head_dim]``.
      key, value: ``[batch, kv_len, num_kv_heads, head_dim]``; ``num_heads`` must be a multiple of
        ``num_kv_heads`` (query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``).
      mask: bool, broadcastable to ``[batch, q_len, kv_len]``; True where a query may attend.
      scale: score multiplier, default ``head_dim ** -0.5``.

    Returns:
      ``[batch, q_len, num_heads, head_dim]`` in ``query.dtype``. A query row whose mask is all
      False returns zeros (not NaN).
    """
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    q = query.reshape(batch, q_len, num_kv_heads, group, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, key, preferred_element_type=jnp.float32) * scale
    mask = jnp.broadcast_to(mask, (batch, q_len, key.shape[1]))[:, None, None]
    probs = _masked_softmax(scores, mask, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(value.dtype), value)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(query.dtype)


def decode_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array
) -> jax.Array:
    """:func:`dense_attention` of one query (a decode step) over the decoder's KV cache rows,
    with the default scale ``head_dim ** -0.5``.

    The cache holds one contiguous ``[kv_len, head_dim]`` matrix per (sample, KV head), so the
    scores and the output are matrix products batched over one axis, read in place: a
    length-major cache is transposed for the products every layer, and a ``[batch, kv_heads,
    ...]`` one makes XLA:CPU fuse the step's cache write into the products' reshape and copy
    the whole cache.

    Args:
      query: ``[batch, 1, num_heads, head_dim]``.
      key, value: ``[batch·num_kv_heads, kv_len, head_dim]``, row ``b·num_kv_heads + h``
        holding sample ``b``'s KV head ``h``.
      mask: bool, broadcastable to ``[batch, 1, kv_len]``; True where the query may attend.

    Returns:
      ``[batch, 1, num_heads, head_dim]`` in ``query.dtype``; zeros where the mask is all False.
    """
    batch, _, num_heads, head_dim = query.shape
    rows, kv_len = key.shape[:2]
    scale = head_dim**-0.5
    q = query.reshape(rows, num_heads * batch // rows, head_dim)
    scores = jnp.einsum("rgd,rld->rgl", q, key, preferred_element_type=jnp.float32) * scale
    mask = jnp.broadcast_to(mask, (batch, 1, kv_len))[:, None]
    mask = jnp.broadcast_to(mask, (batch, rows // batch, 1, kv_len)).reshape(rows, 1, kv_len)
    probs = _masked_softmax(scores, mask, axis=-1).astype(value.dtype)
    out = jnp.einsum("rgl,rld->rgd", probs, value)
    return out.reshape(batch, 1, num_heads, head_dim).astype(query.dtype)


def _masked_softmax(scores: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
    """Softmax of float32 ``scores`` along ``axis`` under ``mask``; all-masked rows are 0."""
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=axis, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(weights, axis=axis, keepdims=True)
    return weights / jnp.where(denom > 0, denom, 1.0)


def dense_visibility(query_meta: TokenMeta, kv_meta: TokenMeta) -> jax.Array:
    """Dense attention's mask ``[batch, q_len, kv_len]`` from token metadata (DESIGN.md §2).

    Every query sees every earlier (by position) real token, except context tokens, which see
    only their own unit. This is gaze attention with every earlier region selected.
    """
    causal = kv_meta.position[:, None, :] <= query_meta.position[:, :, None]
    return visibility(query_meta, kv_meta, causal[:, :, None, :])[:, :, 0, :]


def causal_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    query_meta: TokenMeta,
    kv_meta: TokenMeta,
) -> jax.Array:
    """Dense attention under :func:`dense_visibility`, block by block (only the causal work).

    Block pairs that no query can see (the future, a cache's unwritten tail) are skipped and no
    score matrix exceeds one block pair (:mod:`kernels.gaze_attention.blockwise`). Keys that fit
    in one key block (``kv_len <= blockwise.KV_BLOCK``: training sequences of a few hundred
    tokens) leave nothing to skip, so they take the masked dense path, whose scores are then a
    column of block pairs. Shapes as :func:`dense_attention`, with ``query_meta [batch, q_len]``
    and ``kv_meta [batch, kv_len]`` in place of the mask; equal to ``dense_attention(...,
    dense_visibility(...))``.
    """
    if key.shape[1] <= blockwise.KV_BLOCK:
        return dense_attention(query, key, value, dense_visibility(query_meta, kv_meta))

    def block_mask(q_meta, k_meta, _):
        return dense_visibility(q_meta, k_meta)[:, :, None, :]

    scale = query.shape[-1] ** -0.5
    out, _ = blockwise.blockwise_attention(
        query, key, value, query_meta, kv_meta, block_mask, scale=scale
    )
    return out.astype(query.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Rotate-half RoPE tables, computed in float32.

    Args:
      positions: int ``[batch, seq]`` position ids.
    Returns:
      ``(cos, sin)``, each float32 ``[batch, seq, head_dim]``.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x [batch, seq, heads, head_dim]`` by tables ``[batch, seq, head_dim]``.

    The tables are cast to ``x.dtype`` first, as Hugging Face does.
    """
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin

"""Blockwise attention under a mask defined by token metadata: only the causal work.

Queries are cut into blocks of ``query_block`` and keys into blocks of ``kv_block``; each query
block runs an online softmax over the key blocks, and a block pair is skipped (``lax.cond``)
when no query of the block can see any key of it: every key lies after every query by position
(the future, or the unwritten tail of a preallocated cache, whose slots are padding) and no
context query shares a unit with a visual key. No score matrix is larger than one block pair
``[batch, heads, query_block, kv_block]``; the forward and the backward (both rematerialised per
query block and per pair) hold one pair's scores at a time.

The skip rule is conservative for :func:`~kernels.gaze_attention.metadata.visibility` and any
mask inside it: a query sees a key only if both are real and the key is not later by position,
except that a context query sees its own unit's visual tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kernels.gaze_attention.metadata import TokenKind, TokenMeta

QUERY_BLOCK = 128
KV_BLOCK = 256

BlockMask = Callable[[TokenMeta, TokenMeta, Any], jax.Array]

_BIG = jnp.iinfo(jnp.int32).max


def blockwise_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    query_meta: TokenMeta,
    kv_meta: TokenMeta,
    block_mask: BlockMask,
    query_extra: Any = None,
    *,
    scale: float,
    query_block: int | None = None,
    kv_block: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Softmax attention of ``query`` over ``key``/``value`` under ``block_mask``, by blocks.

    Args:
      query: [batch, q_len, num_heads, head_dim].
      key, value: [batch, kv_len, num_kv_heads, head_dim]; query head ``h`` reads KV head
        ``h // (num_heads // num_kv_heads)``.
      query_meta: [batch, q_len]; kv_meta: [batch, kv_len] metadata (padding: kind ``-1``).
      block_mask: ``(query_meta [b, bq], kv_meta [b, bk], query_extra block) -> bool
        [b, bq, num_heads or 1, bk]``, True where a query (head) may attend; it must lie within
        :func:`~kernels.gaze_attention.metadata.visibility` with every region selected.
      query_extra: optional pytree of arrays ``[batch, q_len, ...]`` cut into query blocks
        alongside the queries and handed to ``block_mask`` (e.g. a selection).
      scale: logit scale.
      query_block, kv_block: block sizes; default :data:`QUERY_BLOCK`, :data:`KV_BLOCK`.

    Returns:
      ``(out [batch, q_len, num_heads, head_dim], lse [batch, q_len, num_heads])`` float32,
      ``out`` normalised; ``out = 0`` and ``lse = -inf`` (finite gradients) where a query head
      sees nothing. Differentiable in ``query``, ``key`` and ``value``.
    """
    batch, q_len, num_heads, head_dim = query.shape
    kv_len, num_kv_heads = key.shape[1:3]
    group = num_heads // num_kv_heads
    bq = min(query_block or QUERY_BLOCK, q_len)
    bk = min(kv_block or KV_BLOCK, kv_len)
    num_q = math.ceil(q_len / bq)

    # Head-major blocks, so that each block pair is two plain batched matmuls.
    q_blocks = _blocks(query.reshape(batch, q_len, num_kv_heads, group, head_dim), bq, 0)
    q_blocks = q_blocks.transpose(0, 1, 3, 4, 2, 5).reshape(
        -1, batch, num_kv_heads, group * bq, head_dim
    )
    q_meta_blocks = _blocks(query_meta, bq, TokenKind.PADDING)
    extra_blocks = _blocks(query_extra, bq, 0)
    k_blocks, v_blocks = (_blocks(x, bk, 0).transpose(0, 1, 3, 2, 4) for x in (key, value))
    kv_meta_blocks = _blocks(kv_meta, bk, TokenKind.PADDING)
    live = _live_pairs(q_meta_blocks, kv_meta_blocks)  # [num_q, num_kv]

    def pair(state, q, q_meta, extra, k, v, kv_meta):
        """Adds one key block to the online-softmax state of one query block.

        ``q [b, kv_heads, group·bq, d]``, ``k, v [b, kv_heads, bk, d]``; state rows likewise."""
        peak, total, acc = state
        logits = jnp.einsum("bkqd,bkld->bkql", q, k, preferred_element_type=jnp.float32)
        mask = block_mask(q_meta, kv_meta, extra)  # [b, bq, heads or 1, bk]
        mask = jnp.broadcast_to(mask, (batch, bq, num_heads, bk))
        mask = jnp.moveaxis(mask.reshape(batch, bq, num_kv_heads, group, bk), 1, 3)
        mask = mask.reshape(batch, num_kv_heads, group * bq, bk)
        logits = logits * scale
        block_peak = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1)
        new_peak = jax.lax.stop_gradient(jnp.maximum(peak, block_peak))
        safe = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)
        rescale = jnp.exp(peak - safe)
        weights = jnp.exp(jnp.where(mask, logits - safe[..., None], -jnp.inf))
        total = total * rescale + weights.sum(axis=-1)
        update = jnp.einsum("bkql,bkld->bkqd", weights, v.astype(jnp.float32))
        return new_peak, total, acc * rescale[..., None] + update

    @jax.checkpoint
    def query_row(q, q_meta, extra, live_row):
        @jax.checkpoint
        def step(state, xs):
            k, v, kv_meta, is_live = xs
            state = jax.lax.cond(
                is_live, lambda s: pair(s, q, q_meta, extra, k, v, kv_meta), lambda s: s, state
            )
            return state, None

        shape = (batch, num_kv_heads, group * bq)
        state = (
            jnp.full(shape, -jnp.inf, jnp.float32),
            jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32),
        )
        (peak, total, acc), _ = jax.lax.scan(
            step, state, (k_blocks, v_blocks, kv_meta_blocks, live_row)
        )
        seen = total > 0
        out = acc / jnp.where(seen, total, 1.0)[..., None]
        lse = jnp.where(seen, peak + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
        # [b, kv_heads, group·bq, ...] -> [b, bq, heads, ...]
        out = out.reshape(batch, num_kv_heads, group, bq, head_dim).transpose(0, 3, 1, 2, 4)
        lse = lse.reshape(batch, num_kv_heads, group, bq).transpose(0, 3, 1, 2)
        return out.reshape(batch, bq, num_heads, head_dim), lse.reshape(batch, bq, num_heads)

    def row(_, xs):
        return None, query_row(*xs)

    _, (out, lse) = jax.lax.scan(row, None, (q_blocks, q_meta_blocks, extra_blocks, live))

    def unblock(x):
        return jnp.moveaxis(x, 0, 1).reshape(batch, num_q * bq, *x.shape[3:])[:, :q_len]

    return unblock(out), unblock(lse)


def _blocks(tree, block: int, fill):
    """Pytree of ``[batch, length, ...]`` → ``[num_blocks, batch, block, ...]`` (tail padded)."""

    def cut(x):
        length = x.shape[1]
        num = math.ceil(length / block)
        pad = [(0, 0), (0, num * block - length)] + [(0, 0)] * (x.ndim - 2)
        x = jnp.pad(x, pad, constant_values=fill) if num * block > length else x
        return jnp.moveaxis(x.reshape(x.shape[0], num, block, *x.shape[2:]), 1, 0)

    return jax.tree.map(cut, tree)


def _live_pairs(q_meta: TokenMeta, kv_meta: TokenMeta) -> jax.Array:
    """[num_q, num_kv] bool: a query of the block may see a key of the block in some sample.

    Inputs are blocked metadata ``[num_blocks, batch, block]``. A pair is live when some real
    key is not later than some real query, or a context query's unit holds a visual key.
    """
    q_last = jnp.max(jnp.where(q_meta.valid, q_meta.position, -1), axis=-1)  # [nq, b]
    kv_first = jnp.min(jnp.where(kv_meta.valid, kv_meta.position, _BIG), axis=-1)  # [nk, b]
    context = q_meta.kind == TokenKind.CONTEXT
    visual = kv_meta.kind == TokenKind.VISUAL
    ctx_lo = jnp.min(jnp.where(context, q_meta.unit, _BIG), axis=-1)
    ctx_hi = jnp.max(jnp.where(context, q_meta.unit, -1), axis=-1)
    vis_lo = jnp.min(jnp.where(visual, kv_meta.unit, _BIG), axis=-1)
    vis_hi = jnp.max(jnp.where(visual, kv_meta.unit, -1), axis=-1)
    causal = kv_first[None] <= q_last[:, None]  # [nq, nk, b]
    same_unit = (ctx_lo[:, None] <= vis_hi[None]) & (vis_lo[None] <= ctx_hi[:, None])
    return (causal | same_unit).any(axis=-1)

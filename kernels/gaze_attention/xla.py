"""Gaze attention in plain XLA: a region-gather decode and a blockwise many-query path.

Decode (``q_len == 1``) reads only what the query may see: the text and context tokens (the
*unrouted* part), then the selected regions, each the cache slice ``start + [0, m)`` (tail
beyond the region's length masked). Each KV head reads the union of its query heads' regions
once (per-head routing; a per-head mask keeps each head to its own picks), gathered in one go
(no loop: a cache that enters a ``while`` loop is copied whole), and their softmax is merged
with the unrouted part's state (log-sum-exp). Decode reads the cache length-major
``[b, kv_len, kv_heads, d]`` or, with ``heads_first``, head-major ``[b, kv_heads, kv_len, d]``
(the decoder's cache: each KV head's rows contiguous, no transpose anywhere).

Many queries (prefill, training) run :mod:`~kernels.gaze_attention.blockwise`: query blocks ×
key blocks under an online softmax, block pairs wholly in the future (or in a cache's unwritten
tail) skipped, no score matrix larger than a block pair, in the forward or the backward.

Both take the selection made by the dispatcher (``dispatch.gaze_attention``) and return the
log-sum-exp beside the output, as the sequence-sharded decode (``sharded.py``) needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.gaze_attention import blockwise, reference
from kernels.gaze_attention import routing as routing_lib
from kernels.gaze_attention.metadata import RegionTable, TokenKind, TokenMeta, visibility
from kernels.gaze_attention.routing import Selection


def attend_selected_xla(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    query_meta: TokenMeta,
    kv_meta: TokenMeta,
    table: RegionTable,
    selection: Selection,
    *,
    routing: routing_lib.Routing,
    scale: float,
    max_unrouted_tokens: int | None = None,
    heads_first: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Gaze attention given the selected regions: decode when ``q_len == 1``, else blockwise.

    Args:
      query: [batch, q_len, num_heads, head_dim].
      key, value: [batch, kv_len, num_kv_heads, head_dim], region-major; with ``heads_first``
        [batch, num_kv_heads, kv_len, head_dim].
      query_meta: [batch, q_len]; kv_meta: [batch, kv_len] metadata.
      table: [batch, num_regions] extents of the regions ``selection`` indexes.
      selection: [batch, q_len, num_heads, top_k]; with ``routing="shared"`` the heads of a GQA
        group must hold the same selection (decode reads only the group's first head).
      routing: ``"per_head"`` or ``"shared"``.
      scale: logit scale.
      max_unrouted_tokens: decode only; see :func:`unrouted_state`.
      heads_first: the layout of ``key`` and ``value`` (see above); decode only (the
        dispatcher hands many queries the length-major layout).

    Returns:
      ``(out [batch, q_len, num_heads, head_dim], lse [batch, q_len, num_heads])`` float32,
      ``out`` normalised; ``out = 0`` and ``lse = -inf`` where the query sees nothing.
    """
    if query.shape[1] > 1:
        if heads_first:
            raise ValueError("many queries take length-major keys and values")
        return _blockwise(query, key, value, query_meta, kv_meta, table, selection, scale=scale)
    state = unrouted_state(
        query, key, value, query_meta, kv_meta, scale, max_unrouted_tokens, heads_first
    )
    peak, total, acc = _routed(
        query, key, value, table, selection, routing, scale, state, heads_first
    )
    seen = total > 0
    out = acc / jnp.where(seen, total, 1.0)[..., None]
    lse = jnp.where(seen, peak + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    return out.reshape(query.shape), lse.reshape(query.shape[:3])


def _blockwise(query, key, value, query_meta, kv_meta, table, selection, *, scale):
    """Many queries: :func:`blockwise.blockwise_attention` under the gaze visibility rule."""
    chosen = reference.chosen_regions(selection, table.num_regions)  # [b, q, heads, regions]

    def block_mask(q_meta, k_meta, q_chosen):
        return visibility(q_meta, k_meta, reference.tokens_in_regions(q_chosen, k_meta.region))

    return blockwise.blockwise_attention(
        query, key, value, query_meta, kv_meta, block_mask, chosen, scale=scale
    )


def unrouted_state(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    query_meta: TokenMeta,
    kv_meta: TokenMeta,
    scale: float,
    max_unrouted_tokens: int | None,
    heads_first: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Online-softmax state of the keys the query sees without routing, per KV head.

    Shapes and ``heads_first`` as for :func:`attend_selected_xla` with ``q_len == 1``; returns
    ``(max, sum [batch, num_kv_heads, group], acc [batch, num_kv_heads, group, head_dim])``
    float32.

    With ``max_unrouted_tokens`` only the cache's text and context slots (at most that many per
    sample) are gathered and read; the query must then be a text token. Without it the whole
    cache is read under the full visibility mask, which serves any query kind.
    """
    if max_unrouted_tokens is not None:
        kind = kv_meta.kind
        keep = (kind == TokenKind.TEXT) | (kind == TokenKind.CONTEXT)
        slots = jax.vmap(lambda k: jnp.nonzero(k, size=max_unrouted_tokens, fill_value=0)[0])(keep)
        found = jnp.arange(max_unrouted_tokens) < keep.sum(axis=1, keepdims=True)
        take = jax.vmap(lambda x, i: x[i])
        take_tokens = jax.vmap(lambda x, i: x[:, i]) if heads_first else take
        key, value = take_tokens(key, slots), take_tokens(value, slots)
        kv_meta = jax.tree.map(lambda x: jnp.where(found, take(x, slots), -1), kv_meta)
    if not heads_first:
        key, value = (jnp.swapaxes(x, 1, 2) for x in (key, value))
    no_regions = jnp.zeros((*query.shape[:3], key.shape[2]), bool)
    mask = visibility(query_meta, kv_meta, no_regions)[:, 0]  # [b, heads, kv_len]
    batch, _, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    q = query[:, 0].reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("bkld,bkgd->bklg", key, q, preferred_element_type=jnp.float32) * scale
    state = _empty_state(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    mask = jnp.swapaxes(mask.reshape(batch, num_kv_heads, -1, mask.shape[-1]), -1, -2)
    return _update(state, logits, mask, value)


def _routed(query, key, value, table, selection, routing, scale, state, heads_first):
    """Adds the selected regions to ``state`` (per KV head, ``[b, kv_heads, group, ...]``).

    Each KV head reads the union of its query heads' regions once (:func:`_kv_head_regions`),
    each query head masked to its own regions. Each region is one ``[m, d]`` block of the
    cache as laid out (``heads_first`` or not: only the slice's indices differ), gathered by a
    slice gather (no row index per token), its start moved back where the block would pass the
    cache's end, the tokens outside the region masked.

    All at once: XLA:CPU writes the gathered blocks out before the products read them, and
    glibc maps (and faults in) a buffer above 32 MiB afresh on each call, which is most of a
    per-head float32 step's time at 16384 visual tokens; a loop over chunks that stay in cache
    is 1.8× as fast there but copies the decoder's just-written cache into the loop.
    """
    batch, _, _, head_dim = key.shape
    num_kv_heads, kv_len = key.shape[1:3] if heads_first else key.shape[2:0:-1]
    group = query.shape[2] // num_kv_heads
    capacity = table.capacity
    region, sees = _kv_head_regions(selection, routing, group)  # [b, kv, n], [b, kv, g, n]
    start = jnp.take_along_axis(table.start[:, None], region, axis=-1)  # [b, kv, n]
    end = start + jnp.take_along_axis(table.length[:, None], region, axis=-1)
    first = jnp.minimum(start, kv_len - capacity)  # each block's first row
    token = first[..., None] + jnp.arange(capacity, dtype=jnp.int32)  # [b, kv, n, m]
    inside = (token >= start[..., None]) & (token < end[..., None])
    mask = jnp.moveaxis(sees, 2, 3)[..., None, :] & inside[..., None]  # [b, kv, n, m, g]

    def block(x, sample, kv_head, row):
        if heads_first:
            return jax.lax.dynamic_slice(x, (sample, kv_head, row, 0), (1, 1, capacity, head_dim))
        return jax.lax.dynamic_slice(x, (sample, row, kv_head, 0), (1, capacity, 1, head_dim))

    per_region = jax.vmap(block, (None, None, None, 0))
    per_head = jax.vmap(per_region, (None, None, 0, 0))
    blocks = jax.vmap(per_head, (None, 0, None, 0))
    samples = jnp.arange(batch, dtype=jnp.int32)
    kv_heads = jnp.arange(num_kv_heads, dtype=jnp.int32)
    keys, values = (
        _as_float(blocks(_as_bits(x), samples, kv_heads, first), x.dtype).reshape(
            batch, num_kv_heads, -1, head_dim
        )
        for x in (key, value)
    )
    q = query[:, 0].reshape(batch, num_kv_heads, group, head_dim).astype(jnp.float32)
    logits = jnp.einsum("bknd,bkgd->bkng", keys, q) * scale
    return _update(state, logits, mask.reshape(logits.shape), values)


def _kv_head_regions(selection: Selection, routing, group: int):
    """The regions each KV head reads and which of its query heads see each.

    Returns ``region [b, kv_heads, n]`` (indices into the table; 0 in unused slots) and ``sees
    [b, kv_heads, group, n]`` bool. Shared routing: the group's K regions, seen by all its heads
    (``n = K``). Per-head routing: the union of the group's picks, each region once (sorted;
    repeats and invalid slots are seen by no head, ``n = group·K``), seen by the heads that
    picked it.
    """
    picks = jnp.where(selection.valid[:, 0], selection.region[:, 0], -1)  # [b, heads, K]
    batch, num_heads, top_k = picks.shape
    picks = picks.reshape(batch, num_heads // group, group, top_k)
    if routing == "shared":
        return jnp.maximum(picks[:, :, 0], 0), jnp.broadcast_to(picks[:, :, :1] >= 0, picks.shape)
    union = jnp.sort(picks.reshape(batch, num_heads // group, group * top_k), axis=-1)
    previous = jnp.pad(union, [(0, 0), (0, 0), (1, 0)], constant_values=-1)[..., :-1]
    first = (union >= 0) & (union != previous)
    picked = (picks[..., :, None] == union[:, :, None, None, :]).any(axis=-2)  # [b, kv, g, n]
    return jnp.maximum(union, 0), picked & first[:, :, None]


def _as_bits(x: jax.Array) -> jax.Array:
    """A 2-byte cache viewed as ``uint16``, which fuses into the gather: XLA:CPU gathers 2-byte
    floats from a float32 conversion of the whole operand (seen in its compiled HLO)."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def _as_float(bits: jax.Array, dtype) -> jax.Array:
    """Gathered :func:`_as_bits` values as float32."""
    if jnp.dtype(dtype).itemsize == 2:
        bits = jax.lax.bitcast_convert_type(bits, dtype)
    return bits.astype(jnp.float32)


def _empty_state(batch: int, groups: int, per_group: int, head_dim: int):
    """Online-softmax state ``(max, sum [b, s, h], acc [b, s, h, d])`` of an empty key set."""
    return (
        jnp.full((batch, groups, per_group), -jnp.inf, jnp.float32),
        jnp.zeros((batch, groups, per_group), jnp.float32),
        jnp.zeros((batch, groups, per_group, head_dim), jnp.float32),
    )


def _update(state, logits, mask, value):
    """Adds keys ``logits [b, s, n, h]`` (under ``mask``) with ``value [b, s, n, d]``.

    ``s`` indexes key sets (KV heads or selections), ``h`` the query heads sharing one; keys
    lead the products' operands (``n`` before ``h``), as they lie in the cache.
    """
    peak, total, acc = state
    logits = jnp.where(mask, logits, -jnp.inf)
    new_peak = jnp.maximum(peak, logits.max(axis=-2))
    safe = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)
    rescale = jnp.exp(peak - safe)
    weights = jnp.exp(logits - safe[..., None, :])
    total = total * rescale + weights.sum(axis=-2)
    contribution = jnp.einsum("bsnd,bsnh->bshd", value.astype(jnp.float32), weights)
    return new_peak, total, acc * rescale[..., None] + contribution

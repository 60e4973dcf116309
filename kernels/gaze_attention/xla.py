"""Gaze attention in plain XLA: a region-gather decode and a blockwise many-query path.

Decode (``q_len == 1``) reads only what the query may see: the text and context tokens (the
*unrouted* part), then the selected regions, each the cache slice ``start + [0, m)`` (tail
beyond the region's length masked). Each KV head reads the union of its query heads' regions
once (per-head routing; a per-head mask keeps each head to its own picks), gathered before the
loop, then a ``lax.scan`` over chunks of a few regions runs an online softmax that starts from
the unrouted part's state (the log-sum-exp merge). On XLA:CPU one big gather feeding a dot is
slow, ``scan(unroll=True)`` slower still, and a cache that enters a loop is copied whole.

Many queries (prefill, training) run :mod:`~kernels.gaze_attention.blockwise`: query blocks ×
key blocks under an online softmax, block pairs wholly in the future (or in a cache's unwritten
tail) skipped, no score matrix larger than a block pair, in the forward or the backward.

Both take the selection made by the dispatcher (``dispatch.gaze_attention``) and return the
log-sum-exp beside the output, as the sequence-sharded decode (``sharded.py``) needs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kernels.gaze_attention import blockwise, reference
from kernels.gaze_attention import routing as routing_lib
from kernels.gaze_attention.metadata import RegionTable, TokenKind, TokenMeta, visibility
from kernels.gaze_attention.routing import Selection

REGIONS_PER_STEP = 8


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
) -> tuple[jax.Array, jax.Array]:
    """Gaze attention given the selected regions: decode when ``q_len == 1``, else blockwise.

    Args:
      query: [batch, q_len, num_heads, head_dim].
      key, value: [batch, kv_len, num_kv_heads, head_dim], region-major.
      query_meta: [batch, q_len]; kv_meta: [batch, kv_len] metadata.
      table: [batch, num_regions] extents of the regions ``selection`` indexes.
      selection: [batch, q_len, num_heads, top_k]; with ``routing="shared"`` the heads of a GQA
        group must hold the same selection (decode reads only the group's first head).
      routing: ``"per_head"`` or ``"shared"``.
      scale: logit scale.
      max_unrouted_tokens: decode only; see :func:`unrouted_state`.

    Returns:
      ``(out [batch, q_len, num_heads, head_dim], lse [batch, q_len, num_heads])`` float32,
      ``out`` normalised; ``out = 0`` and ``lse = -inf`` where the query sees nothing.
    """
    if query.shape[1] > 1:
        return _blockwise(query, key, value, query_meta, kv_meta, table, selection, scale=scale)
    state = unrouted_state(query, key, value, query_meta, kv_meta, scale, max_unrouted_tokens)
    peak, total, acc = _routed(query, key, value, table, selection, routing, scale, state)
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
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Online-softmax state of the keys the query sees without routing, per KV head.

    Shapes as for :func:`attend_selected_xla` with ``q_len == 1``; returns ``(max, sum
    [batch, num_kv_heads, group], acc [batch, num_kv_heads, group, head_dim])`` float32.

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
        key, value = take(key, slots), take(value, slots)
        kv_meta = jax.tree.map(lambda x: jnp.where(found, take(x, slots), -1), kv_meta)
    no_regions = jnp.zeros((*query.shape[:3], key.shape[1]), bool)
    mask = visibility(query_meta, kv_meta, no_regions)[:, 0]  # [b, heads, kv_len]
    batch, _, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    q = query[:, 0].reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("bkgd,blkd->bkgl", q, key, preferred_element_type=jnp.float32) * scale
    state = _empty_state(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    return _update(state, logits, mask.reshape(logits.shape), value.transpose(0, 2, 1, 3))


def _routed(query, key, value, table, selection, routing, scale, state):
    """Adds the selected regions to ``state`` (per KV head, ``[b, kv_heads, group, ...]``).

    Each KV head reads the union of its query heads' regions once (:func:`_kv_head_regions`),
    gathered before any loop: a cache that entered a ``while`` loop would be copied whole (it
    is the step's donated output too). The gathered rows then go through the online softmax
    :data:`REGIONS_PER_STEP` regions per ``lax.scan`` step, each query head masked to its own
    regions. Rows are gathered as ``uint32`` words for 2-byte caches (see :func:`_as_rows`).
    """
    batch, _, num_heads, head_dim = query.shape
    kv_len, num_kv_heads = key.shape[1:3]
    group = num_heads // num_kv_heads
    region, sees = _kv_head_regions(selection, routing, group)  # [b, kv, n], [b, kv, g, n]
    count = region.shape[-1]
    num_steps = math.ceil(count / REGIONS_PER_STEP)
    chunk = math.ceil(count / num_steps)
    pad = [(0, 0), (0, 0), (0, num_steps * chunk - count)]
    region = jnp.pad(region, pad)
    sees = jnp.pad(sees, [(0, 0), *pad])
    start = jnp.take_along_axis(table.start[:, None], region, axis=-1)  # [b, kv, n]
    length = jnp.take_along_axis(table.length[:, None], region, axis=-1)

    slot = jnp.arange(table.capacity, dtype=jnp.int32)
    token = jnp.minimum(start[..., None] + slot, kv_len - 1)  # [b, kv, n, m]
    kv_head = jnp.arange(num_kv_heads, dtype=jnp.int32)[:, None, None]
    sample = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None] * kv_len
    row = (sample + token) * num_kv_heads + kv_head
    mask = sees[..., None] & (slot < length[..., None])[:, :, None]  # [b, kv, g, n, m]

    def per_step(x, axis):  # [..., n, m, ...] at ``axis`` -> [steps, ..., chunk·m, ...]
        x = x.reshape(*x.shape[:axis], num_steps, chunk * table.capacity, *x.shape[axis + 2 :])
        return jnp.moveaxis(x, axis, 0)

    keys, values = (
        per_step(_as_rows(x).at[row].get(mode="promise_in_bounds"), 2) for x in (key, value)
    )
    q = query[:, 0].reshape(batch, num_kv_heads, group, head_dim).astype(jnp.float32)

    def step(state, xs):
        keys, values, mask = xs
        keys, values = _unpack(keys, key.dtype), _unpack(values, value.dtype)
        logits = jnp.einsum("bkgd,bknd->bkgn", q, keys) * scale
        return _update(state, logits, mask, values), None

    state, _ = jax.lax.scan(step, state, (keys, values, per_step(mask, 3)))
    return state


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


def _as_rows(x: jax.Array) -> jax.Array:
    """[batch, len, heads, d] → [batch·len·heads, words]; 2-byte values packed in uint32 pairs."""
    rows = x.reshape(-1, x.shape[-1])
    if x.dtype.itemsize == 2:
        rows = jax.lax.bitcast_convert_type(rows.reshape(rows.shape[0], -1, 2), jnp.uint32)
    return rows


def _unpack(words: jax.Array, dtype) -> jax.Array:
    """Gathered rows of :func:`_as_rows` as float32 [..., head_dim]."""
    if jnp.dtype(dtype).itemsize == 2:
        words = jax.lax.bitcast_convert_type(words, dtype).reshape(*words.shape[:-1], -1)
    return words.astype(jnp.float32)


def _empty_state(batch: int, groups: int, per_group: int, head_dim: int):
    """Online-softmax state ``(max, sum [b, s, h], acc [b, s, h, d])`` of an empty key set."""
    return (
        jnp.full((batch, groups, per_group), -jnp.inf, jnp.float32),
        jnp.zeros((batch, groups, per_group), jnp.float32),
        jnp.zeros((batch, groups, per_group, head_dim), jnp.float32),
    )


def _update(state, logits, mask, value):
    """Adds keys ``logits [b, s, h, n]`` (under ``mask``) with ``value [b, s, n, d]``.

    ``s`` indexes key sets (KV heads or selections), ``h`` the query heads sharing one.
    """
    peak, total, acc = state
    logits = jnp.where(mask, logits, -jnp.inf)
    new_peak = jnp.maximum(peak, logits.max(axis=-1))
    safe = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)
    rescale = jnp.exp(peak - safe)
    weights = jnp.exp(logits - safe[..., None])
    total = total * rescale + weights.sum(axis=-1)
    contribution = jnp.einsum("bshn,bsnd->bshd", weights, value.astype(jnp.float32))
    return new_peak, total, acc * rescale[..., None] + contribution

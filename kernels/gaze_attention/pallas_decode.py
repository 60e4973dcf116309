"""Pallas decode kernel for gaze attention (``q_len == 1``): flash-decoding over segment lists,
TPU (Mosaic) and GPU (Triton).

Same semantics as the ``"xla"`` decode. Selection stays in XLA (the dispatcher's
:func:`routing.select_regions`, exact ``lax.top_k`` on float32 scores); the kernel then
attends, per (sample, KV head), to a list of *segments*, each at most ``span`` consecutive cache
slots ``start + [0, length)``:

1. the *unrouted* keys the query sees (text and context tokens, at most ``max_unrouted_tokens``,
   the same slots the xla decode gathers), found in XLA from the metadata as runs of consecutive
   slots, cut into pieces of at most ``span`` slots; every query head of the group uses them;
2. the regions the GQA group selected, deduplicated: with per-head routing each region is
   fetched once per KV head, with a bitmask of the query heads that selected it (the score rows
   of the other heads are masked); with shared routing the group has one set, all bits set.

Flash-decoding split. A (sample, KV head)'s segment list is cut into ``splits`` contiguous
chunks (``chunk s`` = segments ``[s·n/splits, (s+1)·n/splits)`` of its ``n``), one program
each, so batch 1 with 8 KV heads still fills a GPU (grid ``(batch, kv_heads, splits)``, by
default ~256 programs on GPU). Each program writes a partial normalised output and its
log-sum-exp; a second pass in XLA merges the splits by log-sum-exp. All softmax arithmetic is
float32; bfloat16 keys and values meet bfloat16 queries and probabilities in the two dots, with
float32 accumulation (float32 inputs use ``HIGHEST`` precision). A row that sees nothing gives
``lse = -inf`` and output 0.

Reads. The kernel reads the decoder's cache as it lies, ``[batch·kv_heads, kv_len, head_dim]``
(``heads_first`` keys and values ``[batch, kv_heads, kv_len, head_dim]``, a free reshape): one
(sample, KV head)'s slots are one contiguous matrix, so a segment is one contiguous window of
``[rows, head_dim]`` (rows outside the segment masked, their values zeroed). A length-major cache
``[batch, kv_len, kv_heads, head_dim]`` is transposed first: a copy of the whole cache per call,
which a decode loop should not pay (the decoder passes its cache head-major).

- GPU (Triton): segment lists as ordinary operands, plain loads of ``rows = next power of two
  >= m`` (at least 16) starting at the segment (clamped at the cache's end); the group's query
  rows padded to 16, Triton's smallest ``dot``.
- TPU (Mosaic): segment lists by scalar prefetch (SMEM); K/V stay in HBM and each window is a
  DMA of whole ``head_dim`` rows (the lane dimension) starting at a row that is a multiple of
  the sublane tile (8 float32, 16 bfloat16) below the segment start, ``rows = m + tile - 1``
  rounded up; double-buffered ``make_async_copy`` DMAs into VMEM scratch (segment ``i + 1``
  copies while ``i`` computes). A cache whose length is not a multiple of the sublane tile is
  padded (a copy: allocate caches in multiples of 16).

Without ``max_unrouted_tokens`` (any query kind: the whole cache outside the regions may be
visible) the unrouted part is the xla decode's own (:func:`xla.unrouted_state`, which reads
the whole cache), merged with the kernel's routed part by log-sum-exp; decode steps should pass
the bound. ``tests/aot/compile_kernels.py`` compiles both kernels for an H100 and TPU v5e/v6e.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from kernels.gaze_attention import routing as routing_lib
from kernels.gaze_attention import xla
from kernels.gaze_attention.metadata import RegionTable, TokenKind, TokenMeta, visibility
from kernels.gaze_attention.platform import Backend, Compiler, compiler_for, dot, interprets
from kernels.gaze_attention.routing import Selection

MAX_GROUP = 30  # query heads per KV head: one bit each in an int32 mask
TRITON_MIN_DOT = 16  # Triton's smallest dot dimension
PROGRAMS = {"triton": 256, "mosaic": 8}  # default programs to aim for: ~2 waves on 132 SMs

__all__ = ["attend_selected_pallas_decode", "Window", "window"]


def attend_selected_pallas_decode(
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
    splits: int | None = None,
    backend: Backend | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Decode attention over the unrouted keys and the regions of a given ``selection``.

    Args:
      query: [batch, 1, num_heads, head_dim].
      key, value: [batch, kv_len, num_kv_heads, head_dim]; with ``heads_first`` [batch,
        num_kv_heads, kv_len, head_dim], read in place (length-major ones are transposed).
      query_meta: [batch, 1]; kv_meta: [batch, kv_len].
      table: [batch, num_regions] region table (static capacity ``m``).
      selection: [batch, 1, num_heads, top_k] regions (identical within a GQA group when
        ``routing == "shared"``).
      routing: ``"per_head"`` or ``"shared"``.
      scale: logit scale.
      max_unrouted_tokens: static bound on a sample's text + context slots (the first that many
        in slot order are read, as in the xla decode); ``None`` reads the unrouted part in XLA.
      heads_first: the layout of ``key`` and ``value`` (above).
      splits: programs per (sample, KV head), each over a contiguous chunk of its segments;
        default: enough for ~256 programs on GPU (~8 on TPU; 2 interpreted), at most the
        segments there may be.
      backend: ``"tpu"`` (Mosaic), ``"gpu"``/``"cuda"``/``"triton"`` (Triton), ``"cpu"`` (the
        TPU kernel, interpreted); default ``platform.target_platform()``.
      interpret: run the kernel in interpret mode; default: where the default device cannot
        run it (a CPU; the Mosaic kernel on a GPU).

    Returns:
      ``(out [batch, 1, num_heads, head_dim] float32 normalised, lse [batch, 1, num_heads]
      float32)``; ``lse = -inf`` and ``out = 0`` where the query head sees nothing.
    """
    routing_lib.validate_routing(routing)
    compiler = compiler_for(backend)
    interpret = interprets(interpret, compiler)
    if not heads_first:
        key, value = (jnp.swapaxes(x, 1, 2) for x in (key, value))
    batch, _, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    if group > MAX_GROUP:
        raise ValueError(f"at most {MAX_GROUP} query heads per KV head, got {group}")
    if compiler == "triton" and head_dim & (head_dim - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two head_dim, got {head_dim}")
    geometry = window(table.capacity, compiler, key.dtype)
    if max_unrouted_tokens is None:
        empty = jnp.zeros((batch, 1), jnp.int32)
        pieces = (empty[:, 0], empty, empty)
    else:
        pieces = _unrouted_pieces(query_meta, kv_meta, max_unrouted_tokens, geometry.span)
    regions = _selected_regions(table, selection, num_kv_heads, routing)
    most = pieces[1].shape[-1] + regions[1].shape[-1]  # segments a (sample, KV head) may have
    if splits is None:  # interpreted: 2, so the merge is exercised at little cost
        splits = 2 if interpret else -(-PROGRAMS[compiler] // (batch * num_kv_heads))
    splits = max(1, min(splits, most))
    q = query[:, 0].reshape(batch, num_kv_heads, group, head_dim)
    call = _triton_call if compiler == "triton" else _mosaic_call
    out, lse = call(
        pieces,
        regions,
        q,
        *(_rows(x, geometry) for x in (key, value)),
        scale=scale,
        geometry=geometry,
        splits=splits,
        interpret=interpret,
    )
    out, lse = _merge_splits(out, lse)  # [b, kv_heads, group(, d)]
    if max_unrouted_tokens is None:
        state = xla.unrouted_state(query, key, value, query_meta, kv_meta, scale, None, True)
        out, lse = _merge(out, lse, state)
    return out.reshape(batch, 1, num_heads, head_dim), lse.reshape(batch, 1, num_heads)


class Window(NamedTuple):
    """How a segment is read: ``rows`` cache rows from a start that is a multiple of ``align``;
    a segment holds at most ``span = rows - align + 1`` slots, so it fits from any start."""

    rows: int
    align: int

    @property
    def span(self) -> int:
        return self.rows - self.align + 1


def window(capacity: int, compiler: Compiler, dtype) -> Window:
    """The read window of regions of ``capacity`` (``m``) slots: Triton loads from any row
    (``rows`` a power of two >= 16); Mosaic DMAs from a row aligned to the sublane tile."""
    if compiler == "triton":
        return Window(max(TRITON_MIN_DOT, pl.next_power_of_2(capacity)), 1)
    align = max(8, 32 // jnp.dtype(dtype).itemsize)
    return Window(-(-(capacity + align - 1) // align) * align, align)


# ----------------------------------------------------------------------------------------------
# Segment lists (XLA).


def _rows(cache: jax.Array, geometry: Window) -> jax.Array:
    """A head-major ``cache [batch, kv_heads, kv_len, d]`` as the kernels read it, ``[batch·
    kv_heads, kv_len', d]`` (a reshape), its length padded to a multiple of ``align`` slots, at
    least ``rows``, so that every window lies inside (a copy, but not for the usual, aligned
    caches)."""
    batch, num_kv_heads, kv_len, head_dim = cache.shape
    rows = cache.reshape(batch * num_kv_heads, kv_len, head_dim)
    target = max(geometry.rows, -(-kv_len // geometry.align) * geometry.align)
    if target == kv_len:
        return rows
    return jnp.pad(rows, [(0, 0), (0, target - kv_len), (0, 0)])


def _unrouted_pieces(
    query_meta: TokenMeta, kv_meta: TokenMeta, max_unrouted_tokens: int, span: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The visible text/context slots as pieces of at most ``span`` consecutive slots.

    The slots are those the xla decode reads: the first ``max_unrouted_tokens`` text and context
    slots of each sample, under the visibility rule of the query (causal for text).

    Returns:
      ``(count [batch], start [batch, pieces], length [batch, pieces])`` int32, pieces packed
      first; ``pieces = min(max_unrouted_tokens, kv_len)`` (at least 1), one piece per slot at
      worst.
    """
    kind = kv_meta.kind
    kv_len = kind.shape[1]
    keep = (kind == TokenKind.TEXT) | (kind == TokenKind.CONTEXT)
    keep &= jnp.cumsum(keep, axis=1) <= max_unrouted_tokens
    no_regions = jnp.zeros(kind.shape, bool)[:, None, None]
    seen = keep & visibility(query_meta, kv_meta, no_regions)[:, 0, 0]
    slot = jnp.arange(kv_len, dtype=jnp.int32)
    after_gap = jnp.pad(~seen[:, :-1], [(0, 0), (1, 0)], constant_values=True)
    run_start = lax.cummax(jnp.where(seen & after_gap, slot, 0), axis=1)
    run_end = lax.cummin(jnp.where(seen, kv_len, slot), axis=1, reverse=True)
    begins = seen & ((slot - run_start) % span == 0)
    size = max(1, min(max_unrouted_tokens, kv_len))
    start = jax.vmap(lambda x: jnp.nonzero(x, size=size, fill_value=0)[0])(begins)
    count = begins.sum(axis=1, dtype=jnp.int32)
    end = jnp.take_along_axis(run_end, start, axis=1)
    length = jnp.where(jnp.arange(size) < count[:, None], jnp.minimum(end - start, span), 0)
    return count, start.astype(jnp.int32), length.astype(jnp.int32)


def _selected_regions(
    table: RegionTable, selection: Selection, num_kv_heads: int, routing: routing_lib.Routing
):
    """The distinct regions each GQA group selected, with the query heads that use each.

    Returns:
      ``(count [batch, kv_heads], start, length, heads [batch, kv_heads, union])`` int32:
      regions packed first in ascending id, ``heads`` a bitmask over the group's query heads;
      ``union = min(selectors · top_k, num_regions)`` (at least 1), ``selectors`` = group size
      (per-head routing) or 1 (shared).
    """
    batch, _, num_heads, top_k = selection.region.shape
    group = num_heads // num_kv_heads
    selectors = group if routing == "per_head" else 1
    region, valid = (
        x[:, 0].reshape(batch, num_kv_heads, group, top_k)[:, :, :selectors]
        for x in (selection.region, selection.valid)
    )
    num_regions = table.num_regions
    ordered = jnp.sort(jnp.where(valid, region, num_regions).reshape(*region.shape[:2], -1))
    first = jnp.concatenate(
        [jnp.ones_like(ordered[..., :1], bool), ordered[..., 1:] != ordered[..., :-1]], axis=-1
    )
    union = max(1, min(selectors * top_k, num_regions))
    ids = jnp.sort(jnp.where(first, ordered, num_regions))[..., :union]  # [b, kv_heads, union]
    member = (valid[:, :, None] & (region[:, :, None] == ids[..., None, None])).any(-1)
    head = jnp.arange(group, dtype=jnp.int32)
    heads = (member[..., head * selectors // group].astype(jnp.int32) << head).sum(-1)
    index = ids.reshape(batch, -1)
    start, length = (  # id num_regions: an empty region
        jnp.take_along_axis(jnp.pad(x, [(0, 0), (0, 1)]), index, axis=1).reshape(ids.shape)
        for x in (table.start, table.length)
    )
    count = (ids < num_regions).sum(-1, dtype=jnp.int32)
    return count, start.astype(jnp.int32), length.astype(jnp.int32), heads


def _merge_splits(out, lse):
    """``(out [b, kv, splits, G, d], lse [b, kv, splits, G])`` of the chunks → their softmax
    over all segments ``(out [b, kv, G, d], lse [b, kv, G])``; ``-inf`` / 0 where none saw."""
    merged = jax.nn.logsumexp(lse, axis=2)
    safe = jnp.where(jnp.isfinite(merged), merged, 0.0)
    weight = jnp.where(jnp.isfinite(lse), jnp.exp(lse - safe[:, :, None]), 0.0)
    return (weight[..., None] * out).sum(axis=2), merged


def _merge(out, lse, state):
    """Merges normalised ``(out [b, kv, g, d], lse [b, kv, g])`` with an xla softmax state."""
    peak, total, acc = state
    seen = total > 0
    lse_b = jnp.where(seen, peak + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    out_b = acc / jnp.where(seen, total, 1.0)[..., None]
    return _merge_splits(jnp.stack([out, out_b], axis=2), jnp.stack([lse, lse_b], axis=2))


# ----------------------------------------------------------------------------------------------
# Kernels.


def _accumulate(state, q, keys, values, offset, length, heads, scale):
    """Adds one segment to the online softmax ``(peak [G, 1], total [G, 1], acc [G, d])``.

    ``q``: [G, d]; ``keys``, ``values``: [rows, d] (the cache's dtype), of which rows
    ``offset + [0, length)`` belong to the segment; ``heads``: int32 bitmask of the query rows
    that use it.
    """
    peak, total, acc = state
    rows, tile = q.shape[0], keys.shape[0]
    token = lax.broadcasted_iota(jnp.int32, (rows, tile), 1)
    row = lax.broadcasted_iota(jnp.int32, (rows, tile), 0)
    mask = (token >= offset) & (token < offset + length) & (((heads >> row) & 1) == 1)
    logits = dot(q.astype(keys.dtype), keys, (1, 1))
    logits = jnp.where(mask, logits * scale, -jnp.inf)
    new_peak = jnp.maximum(peak, logits.max(axis=1, keepdims=True))
    safe = jnp.where(new_peak == -jnp.inf, 0.0, new_peak)
    rescale = jnp.exp(peak - safe)
    weights = jnp.exp(logits - safe)
    inside = lax.broadcasted_iota(jnp.int32, values.shape, 0)
    inside = (inside >= offset) & (inside < offset + length)
    values = jnp.where(inside, values, jnp.zeros((), values.dtype))  # tails may hold anything
    contribution = dot(weights.astype(values.dtype), values, (1, 0))
    return (
        new_peak,
        rescale * total + weights.sum(axis=1, keepdims=True),
        rescale * acc + contribution,
    )


def _empty_state(rows: int, head_dim: int):
    """The online-softmax state of no keys: ``(peak [rows, 1], total [rows, 1], acc)``."""
    return (
        jnp.full((rows, 1), -jnp.inf, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
        jnp.zeros((rows, head_dim), jnp.float32),
    )


def _finish(state):
    """``(out [G, d], lse [G, 1])`` of a softmax state; zeros and ``-inf`` where nothing seen."""
    peak, total, acc = state
    seen = total > 0
    total = jnp.where(seen, total, 1.0)
    return jnp.where(seen, acc / total, 0.0), jnp.where(seen, peak + jnp.log(total), -jnp.inf)


def _segment(i, unrouted, piece, region):
    """``(start, length, heads)`` of segment ``i``: piece ``i``, then region ``i - unrouted``.

    ``piece(n)`` / ``region(n)`` read ``(start, length, heads)`` of an in-range index ``n``.
    """
    routed = i >= unrouted
    from_piece, from_region = piece(i), region(i - unrouted)
    return tuple(jnp.where(routed, r, p) for p, r in zip(from_piece, from_region, strict=True))


def _chunk(total, split, splits):
    """Segments ``[first, last)`` of chunk ``split`` of ``total`` (int32, balanced)."""
    return (split * total) // splits, ((split + 1) * total) // splits


def _fetch_row(start, kv_len: int, geometry: Window):
    """First row of the window of a segment starting at ``start`` (aligned, inside the cache)."""
    aligned = (start // geometry.align) * geometry.align
    return pl.multiple_of(jnp.minimum(aligned, kv_len - geometry.rows), geometry.align)


def _mosaic_kernel(
    piece_count,
    piece_start,
    piece_length,
    region_count,
    region_start,
    region_length,
    region_heads,
    q_ref,
    k_hbm,
    v_hbm,
    out_ref,
    lse_ref,
    k_buf,
    v_buf,
    k_sems,
    v_sems,
    *,
    scale,
    num_kv_heads,
    pieces,
    union,
    splits,
    geometry,
):
    """One chunk of one (sample, KV head): a double-buffered DMA loop over its segments.

    Scalar prefetch (SMEM, flattened): ``piece_*`` [batch(·pieces)], ``region_*``
    [batch·kv_heads(·union)]. ``q_ref``/``out_ref`` [group, d], ``lse_ref`` [group, 1];
    ``k_hbm``/``v_hbm`` [batch·kv_heads, kv_len, d] in HBM; ``*_buf`` [2, rows, d] VMEM.
    """
    b, j, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kv_len = k_hbm.shape[1]
    cache_row = b * num_kv_heads + j  # this (sample, KV head)'s slots
    unrouted = piece_count[b]
    first, last = _chunk(unrouted + region_count[cache_row], split, splits)
    all_heads = (1 << q_ref.shape[0]) - 1

    def piece(n):
        n = b * pieces + jnp.clip(n, 0, pieces - 1)
        return piece_start[n], piece_length[n], all_heads

    def region(n):
        n = cache_row * union + jnp.clip(n, 0, union - 1)
        return region_start[n], region_length[n], region_heads[n]

    def copies(i, slot):
        start, length, heads = _segment(i, unrouted, piece, region)
        fetch = _fetch_row(start, kv_len, geometry)
        rows = pl.ds(fetch, geometry.rows)
        dmas = tuple(
            pltpu.make_async_copy(hbm.at[cache_row, rows], buf.at[slot], sems.at[slot])
            for hbm, buf, sems in ((k_hbm, k_buf, k_sems), (v_hbm, v_buf, v_sems))
        )
        return dmas, (start - fetch, length, heads)

    @pl.when(first < last)
    def _():
        for dma in copies(first, 0)[0]:
            dma.start()

    def body(i, state):
        slot = (i - first) % 2

        @pl.when(i + 1 < last)
        def _():
            for dma in copies(i + 1, 1 - slot)[0]:
                dma.start()

        dmas, segment = copies(i, slot)
        for dma in dmas:
            dma.wait()
        return _accumulate(state, q_ref[...], k_buf[slot], v_buf[slot], *segment, scale)

    state = lax.fori_loop(first, last, body, _empty_state(*q_ref.shape))
    out_ref[...], lse_ref[...] = _finish(state)


def _mosaic_call(pieces, regions, q, key, value, *, scale, geometry, splits, interpret):
    batch, num_kv_heads, group, head_dim = q.shape
    index = lambda b, j, s, *_: (b, j, s, 0, 0)  # noqa: E731
    rows = pl.BlockSpec((None, None, None, group, head_dim), index)
    stats = pl.BlockSpec((None, None, None, group, 1), index)
    kernel = functools.partial(
        _mosaic_kernel,
        scale=scale,
        num_kv_heads=num_kv_heads,
        pieces=pieces[1].shape[-1],
        union=regions[1].shape[-1],
        splits=splits,
        geometry=geometry,
    )
    q_spec = pl.BlockSpec((None, None, group, head_dim), lambda b, j, s, *_: (b, j, 0, 0))
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=7,
            grid=(batch, num_kv_heads, splits),
            in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=[rows, stats],
            scratch_shapes=[
                pltpu.VMEM((2, geometry.rows, head_dim), key.dtype),
                pltpu.VMEM((2, geometry.rows, head_dim), value.dtype),
                pltpu.SemaphoreType.DMA((2,)),
                pltpu.SemaphoreType.DMA((2,)),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((batch, num_kv_heads, splits, group, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_kv_heads, splits, group, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="gaze_decode",
    )(*(x.reshape(-1) for x in (*pieces, *regions)), q, key, value)
    return out, lse[..., 0]


def _triton_kernel(
    piece_count,
    piece_start,
    piece_length,
    region_count,
    region_start,
    region_length,
    region_heads,
    q_ref,
    k_ref,
    v_ref,
    out_ref,
    lse_ref,
    *,
    scale,
    group,
    splits,
    geometry,
):
    """One chunk of one (sample, KV head): a loop of window loads over its segments.

    ``piece_*``: [batch(, pieces)]; ``region_*``: [batch, kv_heads(, union)]; ``q_ref`` [batch,
    kv_heads, G, d] (G = group padded to 16 rows); ``out_ref`` [batch, kv_heads, splits, G, d];
    ``lse_ref`` [batch, kv_heads, splits, G, 1]; ``k_ref``/``v_ref`` [batch·kv_heads, kv_len, d].
    """
    b, j, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pieces, num_kv_heads, union = piece_start.shape[1], region_start.shape[1], region_start.shape[2]
    kv_len, cache_row = k_ref.shape[1], b * num_kv_heads + j
    unrouted = piece_count[b]
    first, last = _chunk(unrouted + region_count[b, j], split, splits)
    all_heads = (1 << group) - 1

    def piece(n):
        n = jnp.clip(n, 0, pieces - 1)
        return piece_start[b, n], piece_length[b, n], all_heads

    def region(n):
        n = jnp.clip(n, 0, union - 1)
        return region_start[b, j, n], region_length[b, j, n], region_heads[b, j, n]

    q = q_ref[b, j]

    def body(i, state):
        start, length, heads = _segment(i, unrouted, piece, region)
        fetch = _fetch_row(start, kv_len, geometry)
        keys = k_ref[cache_row, pl.ds(fetch, geometry.rows), :]
        values = v_ref[cache_row, pl.ds(fetch, geometry.rows), :]
        return _accumulate(state, q, keys, values, start - fetch, length, heads, scale)

    state = lax.fori_loop(first, last, body, _empty_state(*q.shape))
    out_ref[b, j, split], lse_ref[b, j, split] = _finish(state)


def _triton_call(pieces, regions, q, key, value, *, scale, geometry, splits, interpret):
    batch, num_kv_heads, group, head_dim = q.shape
    rows = max(TRITON_MIN_DOT, pl.next_power_of_2(group))
    q = jnp.pad(q, [(0, 0), (0, 0), (0, rows - group), (0, 0)])
    kernel = functools.partial(
        _triton_kernel, scale=scale, group=group, splits=splits, geometry=geometry
    )
    out, lse = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, splits),
        out_shape=[
            jax.ShapeDtypeStruct((batch, num_kv_heads, splits, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_kv_heads, splits, rows, 1), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="gaze_decode",
    )(*pieces, *regions, q, key, value)
    return out[:, :, :, :group], lse[:, :, :, :group, 0]

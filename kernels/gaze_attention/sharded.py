"""Gaze decode over a KV cache sharded along its sequence axis (DESIGN.md §4, issue 4).

The cache's sequence axis is split over the mesh axis ``axis`` (``P`` shards of ``L`` slots);
the query is replicated. Under :func:`jax.shard_map`, every decode step runs, per shard ``s``:

1. **Score locally.** ``s_g = q · d_g`` for the shard's own regions only (its slice of the
   descriptors), masked to the regions the query may route to (``routing.routable``).
2. **Agree on the global top-K.** Each shard keeps its local top-``k`` (``k = min(K, R)``, ``R``
   regions per shard) as ``(score, global region id)`` pairs and all-gathers them (one
   collective: the ids travel bitcast to float32 beside the scores): ``[P·k]``
   candidates per query head (or GQA group), from which every shard takes the same exact top-K.
   Exact, because each global top-K region is in its own shard's local top-``k``. Same tie rule
   as ``routing.select_regions``: candidates are gathered shard-major and each shard's are in
   ``lax.top_k`` order, and global ids grow with the shard (layout contract below), so among
   equal scores the lower global region id comes first. Unroutable regions carry score
   ``-inf`` and id ``-1`` and are never valid; with fewer than K routable regions all are taken
   and the remaining slots are invalid (``region = -1``). The selection equals the unsharded
   one as long as a region's score does not depend on how many regions are scored at once
   (true of XLA:CPU's einsum; a backend that reduces differently could flip exact near-ties,
   as between any two implementations).
3. **Attend locally.** The shard attends to its own visible text and context tokens and to the
   selected regions it holds, through the implementation's ``attend_selected`` (see
   :data:`ATTEND_SELECTED`), giving a normalised float32 partial output and its log-sum-exp
   (``-inf`` where the shard holds nothing the query sees).
4. **Merge by log-sum-exp.** ``M = pmax(lse)``, ``w_s = exp(lse_s - M)``,
   ``out = psum(w_s · out_s) / psum(w_s)`` (one ``psum`` of ``[b, 1, h, d + 1]``).

Keys and values never leave their shard. Communication per step and layer, with ``G`` query
heads (``routing="per_head"``) or KV heads (``"shared"``):

- all-gather of ``[b, 1, G, k]`` float32 scores and int32 ids from each shard:
  ``8·b·G·k`` bytes sent by each shard, ``8·b·G·k·P`` received;
- all-reduce (max) of ``[b, 1, h]`` and all-reduce (sum) of ``[b, 1, h, d + 1]`` float32.

Against the cache's ``2·b·N·h_kv·d·itemsize`` bytes: e.g. ``b = 1``, ``h = 16``, ``h_kv = 8``,
``d = 128``, ``K = 64``, ``P = 8``, per-head routing: 8 KiB sent and 64 KiB gathered per shard,
plus 8.1 KiB all-reduced, per layer and step, against a 256 MiB bfloat16 cache per layer at
``N = 65536`` (shared routing halves the exchange). Two dependent rounds per step (exchange,
then merge), both latency-bound at these sizes.

Layout contract (what :func:`shard_layouts` produces and :func:`check_sharded_layout` checks):

- ``key``, ``value`` ``[batch, P·L, h_kv, d]`` and ``kv_meta`` ``[batch, P·L]``: shard ``s``
  holds slots ``[s·L, (s+1)·L)``.
- Regions never straddle a shard boundary, and region ids are **shard-major**: shard ``s`` owns
  global region ids ``[s·R, (s+1)·R)`` (``R`` = regions per shard; unused ids have
  ``length == 0``), in the order of their slots. ``table`` ``[batch, P·R]`` and ``descriptors``
  ``[batch, P·R, h_kv, d]`` are therefore split along the region axis with the same mesh axis.
  ``table.start`` and ``kv_meta.region`` hold *global* slots and ids: the same arrays,
  unsharded, are a valid input to :func:`~kernels.gaze_attention.gaze_attention`, which gives
  the same result (the tests' oracle). Each shard localises them (``start - s·L``,
  ``region - s·R``).
- Text and context tokens may sit on any shard (so decode steps append text anywhere).

A decode loop builds this once: ``shard_layouts`` re-places the samples' region-major layouts
(``regions.build_layout``) into ``P`` blocks of ``L`` slots, moving a region that would straddle
a boundary to the next shard (padding the gap) and renumbering regions shard-major; then
``regions.batch_layouts`` gives the cache metadata and the :class:`RegionTable` that
``KVCache.empty`` takes, with ``max_len = P·L``; prefill descriptors (``routing.
region_descriptors``) come out ``[batch, P·R, ...]``. Renumbering keeps the regions' order, so
selections match the unsharded layout's up to the id map.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from gazejax.gaze import routing as routing_lib
from gazejax.gaze.regions import RegionTable, SequenceLayout, TokenKind, TokenMeta
from gazejax.gaze.routing import Selection
from kernels.gaze_attention.pallas_decode import attend_selected_pallas
from kernels.gaze_attention.reference import attend_selected_reference
from kernels.gaze_attention.xla import attend_selected_xla

AttendSelected = Callable[..., tuple[jax.Array, jax.Array]]

# Per implementation: attention given a selection, ``(query, key, value, query_meta, kv_meta,
# table, selection, *, routing, scale, max_unrouted_tokens) -> (out f32, lse f32)``. The one
# place to register another implementation. Pallas runs with its defaults: Mosaic on TPU,
# Triton on GPU, the TPU kernel interpreted on CPU.
ATTEND_SELECTED: dict[str, AttendSelected] = {
    "reference": attend_selected_reference,
    "xla": attend_selected_xla,
    "pallas": attend_selected_pallas,
}

__all__ = [
    "ATTEND_SELECTED",
    "check_sharded_layout",
    "shard_layouts",
    "sharded_gaze_decode",
]


def sharded_gaze_decode(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    query_meta: TokenMeta,
    kv_meta: TokenMeta,
    table: RegionTable,
    descriptors: jax.Array | None,
    *,
    mesh: jax.sharding.Mesh,
    top_k: int,
    axis: str = "sequence",
    batch_axis: str | tuple[str, ...] | None = None,
    routing: routing_lib.Routing = "per_head",
    scale: float | None = None,
    implementation: str = "xla",
    max_unrouted_tokens: int | None = None,
) -> tuple[jax.Array, Selection]:
    """One gaze decode step over a sequence-sharded cache; see the module docstring.

    Args:
      query: [batch, 1, num_heads, head_dim], replicated over ``axis``.
      key, value: [batch, P·L, num_kv_heads, head_dim], sharded along the sequence over
        ``axis`` (``P`` its size).
      query_meta: [batch, 1] metadata of the query.
      kv_meta: [batch, P·L] metadata of the cache slots (global region ids), sharded like
        ``key``.
      table: [batch, P·R] regions (global slots), shard-major, sharded along the regions.
      descriptors: [batch, P·R, num_kv_heads, head_dim] sharded like ``table``; None computes
        each shard's from its own keys (reads the shard's whole cache every step).
      mesh: the device mesh; ``axis`` splits the sequence, ``batch_axis`` (optional, mesh
        axis or axes) splits the batch; other mesh axes replicate.
      top_k: K, regions per query head (or GQA group) over the whole cache.
      routing: ``"per_head"`` or ``"shared"``.
      scale: logit scale; default ``1 / sqrt(head_dim)``.
      implementation: a key of :data:`ATTEND_SELECTED`.
      max_unrouted_tokens: xla and pallas: static bound on the text + context slots of a
        sample **on one shard** (text queries only); see ``gaze_attention``.

    Returns:
      ``(out [batch, 1, num_heads, head_dim] in query.dtype, Selection [batch, 1, num_heads,
      top_k] of global region ids)``, both replicated over ``axis``.
    """
    routing_lib.validate_top_k(top_k)
    routing_lib.validate_routing(routing)
    if implementation not in ATTEND_SELECTED:
        raise ValueError(
            f"implementation must be one of {tuple(ATTEND_SELECTED)}, got {implementation!r}"
        )
    if axis not in mesh.shape:
        raise ValueError(f"axis {axis!r} is not a mesh axis {tuple(mesh.shape)}")
    batch, q_len, num_heads, head_dim = query.shape
    kv_len, num_kv_heads = key.shape[1:3]
    if q_len != 1 or key.shape != value.shape or key.shape[-1] != head_dim or (
        num_heads % num_kv_heads
    ):
        raise ValueError(
            f"decode shapes expected: query {query.shape}, key {key.shape}, value {value.shape}"
        )
    num_shards = mesh.shape[axis]
    if kv_len % num_shards or table.num_regions % num_shards or table.num_regions == 0:
        raise ValueError(
            f"cache length {kv_len} and region slots {table.num_regions} must be positive "
            f"multiples of the {num_shards} shards of mesh axis {axis!r}"
        )
    scale = head_dim**-0.5 if scale is None else scale
    replicated, split = PartitionSpec(batch_axis), PartitionSpec(batch_axis, axis)
    args = (query, key, value, query_meta, kv_meta, table)
    specs = (replicated, split, split, replicated, split, split)
    if descriptors is not None:
        args, specs = args + (descriptors,), specs + (split,)
    step = functools.partial(
        _shard_step,
        axis=axis,
        top_k=top_k,
        routing=routing,
        scale=scale,
        attend=functools.partial(
            ATTEND_SELECTED[implementation], max_unrouted_tokens=max_unrouted_tokens
        ),
    )
    return jax.shard_map(
        step,
        mesh=mesh,
        in_specs=specs,
        out_specs=(replicated, replicated),
        # Every shard derives the same selection from the all-gathered candidates, but
        # ``all_gather`` is typed device-varying (jax has no public varying -> invariant cast),
        # so replication of the outputs is not statically checkable; interpret-mode Pallas needs
        # ``check_vma=False`` too (PLATFORM.md).
        check_vma=False,
    )(*args)


def _shard_step(query, key, value, query_meta, kv_meta, table, descriptors=None, *, axis, top_k,
                routing, scale, attend):
    """The body under ``shard_map``: local arrays of one shard, global ids in and out."""
    shard = jax.lax.axis_index(axis)
    num_regions = table.num_regions  # R, this shard's region slots
    first_region = shard * num_regions
    kv_meta = kv_meta.replace(
        region=jnp.where(kv_meta.region >= 0, kv_meta.region - first_region, -1)
    )
    table = table.replace(start=jnp.where(table.length > 0, table.start - shard * key.shape[1], 0))
    if descriptors is None:
        descriptors = routing_lib.region_descriptors(key, kv_meta, num_regions)

    region, valid = _global_top_k(query, descriptors, query_meta, table, first_region,
                                  axis=axis, top_k=top_k, routing=routing)
    group = query.shape[2] // region.shape[2]
    region, valid = (jnp.repeat(x, group, axis=2) for x in (region, valid))
    local = region - first_region
    mine = valid & (local >= 0) & (local < num_regions)
    out, lse = attend(query, key, value, query_meta, kv_meta, table,
                      Selection(jnp.where(mine, local, -1), mine), routing=routing, scale=scale)

    peak = jax.lax.pmax(lse, axis)
    weight = jnp.exp(lse - jnp.where(jnp.isfinite(peak), peak, 0.0))[..., None]  # 0 if unseen
    merged = jax.lax.psum(jnp.concatenate([out * weight, weight], axis=-1), axis)
    total = merged[..., -1:]
    out = merged[..., :-1] / jnp.where(total > 0, total, 1.0)
    return out.astype(query.dtype), Selection(region, valid)


def _global_top_k(query, descriptors, query_meta, table, first_region, *, axis, top_k, routing):
    """Exact global top-K from local top-k candidates: ``(region, valid) [b, 1, G, top_k]``.

    ``G`` is ``num_heads`` (per-head routing) or ``num_kv_heads`` (shared); ``region`` holds
    global ids, ``-1`` where invalid.
    """
    scores = routing_lib.region_scores(query, descriptors, routing)  # [b, 1, G, R]
    allowed = routing_lib.routable(query_meta, table)[:, :, None, :]
    scores = jnp.where(allowed, scores, -jnp.inf)
    best, index = jax.lax.top_k(scores, min(top_k, scores.shape[-1]))
    ids = jnp.where(
        jnp.take_along_axis(jnp.broadcast_to(allowed, scores.shape), index, axis=-1),
        index + first_region,
        -1,
    )
    # One all-gather of (score, id) pairs, shard-major along the candidate axis.
    pairs = jnp.stack([best, jax.lax.bitcast_convert_type(ids, jnp.float32)], axis=-1)
    pairs = jax.lax.all_gather(pairs, axis, axis=3, tiled=True)  # [b, 1, G, P·k, 2]
    candidates = jax.lax.bitcast_convert_type(pairs[..., 1], jnp.int32)
    k = min(top_k, candidates.shape[-1])
    _, pick = jax.lax.top_k(pairs[..., 0], k)
    region = jnp.take_along_axis(candidates, pick, axis=-1)
    pad = [(0, 0)] * 3 + [(0, top_k - k)]
    region = jnp.pad(region, pad, constant_values=-1)
    return region, region >= 0


# ----------------------------------------------------------------------------------------------
# Host side: building and checking the layout contract.


def shard_layouts(
    layouts: Sequence[SequenceLayout],
    num_shards: int,
    *,
    shard_length: int | None = None,
    regions_per_shard: int | None = None,
) -> list[SequenceLayout]:
    """The samples' layouts re-placed into ``num_shards`` blocks of ``shard_length`` slots.

    Slots keep their storage order. A region's slots (with the padding slots that directly
    follow it, e.g. from ``pad_regions=True``, so a padded region keeps its ``m`` slots
    together) never straddle a block boundary: a region that would is moved to the next block
    and the gap filled with padding. Regions are renumbered shard-major: block ``s`` owns ids
    ``[s·R, (s+1)·R)``, ``R = regions_per_shard``, in slot order (unused ids are empty).

    Args:
      layouts: one sample each (``regions.build_layout``).
      num_shards: ``P``, the size of the mesh axis that splits the sequence.
      shard_length: ``L`` slots per shard; default the smallest that fits every sample. Pass a
        larger one to leave room for decoded tokens (``max_len = P·L``).
      regions_per_shard: ``R``; default the most regions any block holds.

    Returns:
      One :class:`SequenceLayout` of ``P·L`` slots and ``P·R`` region slots per sample; stack
      them with ``regions.batch_layouts``.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    atoms = [_atoms(layout) for layout in layouts]
    if shard_length is None:
        shard_length = max(_min_shard_length(sizes, num_shards) for sizes in atoms)
    placed = [_place(sizes, shard_length) for sizes in atoms]
    if any(blocks[-1] >= num_shards for blocks in placed if blocks.size):
        raise ValueError(
            f"the samples do not fit {num_shards} shards of shard_length={shard_length} slots "
            "without splitting a region"
        )
    counts = [_regions_per_block(layout, sizes, blocks, num_shards)
              for layout, sizes, blocks in zip(layouts, atoms, placed, strict=True)]
    needed = max(max(int(c.max()) for c in counts), 1)
    regions_per_shard = needed if regions_per_shard is None else regions_per_shard
    if regions_per_shard < needed:
        raise ValueError(f"regions_per_shard={regions_per_shard} < {needed} regions on a shard")
    return [
        _relayout(layout, sizes, blocks, num_shards, shard_length, regions_per_shard)
        for layout, sizes, blocks in zip(layouts, atoms, placed, strict=True)
    ]


def check_sharded_layout(kv_meta: TokenMeta, table: RegionTable, num_shards: int) -> None:
    """Raises ValueError unless concrete ``kv_meta``/``table`` follow the layout contract."""
    kind, region = np.asarray(kv_meta.kind), np.asarray(kv_meta.region)
    start, length = np.asarray(table.start), np.asarray(table.length)
    kv_len, num_regions = kind.shape[1], start.shape[1]
    if kv_len % num_shards or num_regions % num_shards:
        raise ValueError(
            f"cache length {kv_len} and region slots {num_regions} must be multiples of "
            f"{num_shards} shards"
        )
    shard_length, regions_per_shard = kv_len // num_shards, num_regions // num_shards
    owner = np.arange(num_regions) // regions_per_shard
    used = length > 0
    if (used & ((start // shard_length != owner) |
                ((start + length - 1) // shard_length != owner))).any():
        raise ValueError("a region straddles shards or lies outside the shard owning its id")
    visual = kind == TokenKind.VISUAL
    slot_shard = np.broadcast_to(np.arange(kv_len) // shard_length, kind.shape)
    if (visual & (np.maximum(region, 0) // regions_per_shard != slot_shard)).any():
        raise ValueError("a visual token lies outside the shard owning its region id")


def _atoms(layout: SequenceLayout) -> np.ndarray:
    """Sizes of the indivisible runs of slots: a region with its trailing padding, or a slot."""
    sizes: list[int] = []
    open_region = -1
    for kind, region in zip(layout.kind, layout.region, strict=True):
        if open_region >= 0 and (region == open_region or kind == TokenKind.PADDING):
            sizes[-1] += 1
        else:
            sizes.append(1)
            open_region = region
    return np.asarray(sizes, np.int64)


def _place(sizes: np.ndarray, shard_length: int) -> np.ndarray:
    """Block of every atom, filling blocks in order (next fit); ``P`` blocks iff last < P."""
    blocks = np.empty(sizes.size, np.int64)
    block, used = 0, 0
    for i, size in enumerate(sizes):
        if size > shard_length:
            raise ValueError(f"a region of {size} slots exceeds shard_length={shard_length}")
        if used + size > shard_length:
            block, used = block + 1, 0
        blocks[i], used = block, used + size
    return blocks


def _min_shard_length(sizes: np.ndarray, num_shards: int) -> int:
    """Smallest block length with which next fit uses at most ``num_shards`` blocks.

    Blocks needed never grow with the length, and ``ceil(total / P) + largest atom`` always
    fits (each closed block holds more than ``total / P`` slots): binary search between.
    """
    if not sizes.size:
        return 1
    low = max(int(sizes.max()), -(-int(sizes.sum()) // num_shards))
    high = -(-int(sizes.sum()) // num_shards) + int(sizes.max())
    while low < high:
        middle = (low + high) // 2
        if _place(sizes, middle)[-1] < num_shards:
            high = middle
        else:
            low = middle + 1
    return low


def _regions_per_block(layout, sizes, blocks, num_shards) -> np.ndarray:
    """[num_shards] distinct regions in each block."""
    slot_block = np.repeat(blocks, sizes)
    visual = layout.region >= 0
    counts = np.zeros(num_shards, np.int64)
    for block in range(num_shards):
        counts[block] = np.unique(layout.region[visual & (slot_block == block)]).size
    return counts


def _relayout(layout, sizes, blocks, num_shards, shard_length, regions_per_shard):
    """``layout`` with atoms placed in ``blocks`` and regions renumbered shard-major."""
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    offset = np.zeros_like(first)  # slot of each atom within its block
    for i in range(1, sizes.size):
        if blocks[i] == blocks[i - 1]:
            offset[i] = offset[i - 1] + sizes[i - 1]
    slot_block = np.repeat(blocks, sizes)
    dest = np.repeat(blocks * shard_length + offset - first, sizes) + np.arange(layout.length)

    region = layout.region.copy()
    for block in range(num_shards):
        here = (slot_block == block) & (region >= 0)
        _, first_slot, index = np.unique(layout.region[here], return_index=True,
                                         return_inverse=True)
        rank = np.argsort(np.argsort(first_slot))  # ids in order of their first slot
        region[here] = block * regions_per_shard + rank[index]

    length = num_shards * shard_length
    columns = {}
    for name, values in (("kind", layout.kind), ("unit", layout.unit), ("region", region),
                         ("position", layout.position)):
        column = np.full(length, -1, np.int32)
        column[dest] = values
        columns[name] = column
    num_regions = num_shards * regions_per_shard
    real = np.flatnonzero(columns["region"] >= 0)
    ids = columns["region"][real]
    region_length = np.bincount(ids, minlength=num_regions)
    region_start = np.full(num_regions, length, np.int64)
    np.minimum.at(region_start, ids, real)
    region_start[region_length == 0] = 0
    last_position = np.full(num_regions, -1, np.int64)
    np.maximum.at(last_position, ids, columns["position"][real])
    return SequenceLayout(
        **columns,
        region_start=region_start.astype(np.int32),
        region_length=region_length.astype(np.int32),
        region_last_position=last_position.astype(np.int32),
        region_capacity=layout.region_capacity,
        num_units=layout.num_units,
    )

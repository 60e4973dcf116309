"""Gaze decode over a KV cache sharded along its sequence axis (DESIGN.md §4, issues 4, 13).

Also here, for the same cache: :func:`sharded_dense_decode` (the dense baseline, merged by the
same log-sum-exp) and :func:`sharded_region_descriptors` (a prefill's descriptors, each shard's
from its own keys). ``gazejax.models.sequence_split`` calls all three from the decoder.

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

Layout contract (what ``gazejax.gaze.shard_layout.shard_layouts`` produces and
:func:`check_sharded_layout` checks):

- ``key``, ``value`` ``[batch, P·L, h_kv, d]`` (or head-major ``[batch, h_kv, P·L, d]``, the
  decoder's cache, with ``heads_first``) and ``kv_meta`` ``[batch, P·L]``: shard ``s`` holds
  slots ``[s·L, (s+1)·L)``.
- Regions never straddle a shard boundary, and region ids are **shard-major**: shard ``s`` owns
  global region ids ``[s·R, (s+1)·R)`` (``R`` = regions per shard; unused ids have
  ``length == 0``), in the order of their slots. ``table`` ``[batch, P·R]`` and ``descriptors``
  ``[batch, P·R, h_kv, d]`` are therefore split along the region axis with the same mesh axis.
  ``table.start`` and ``kv_meta.region`` hold *global* slots and ids: the same arrays,
  unsharded, are a valid input to :func:`~kernels.gaze_attention.gaze_attention`, which gives
  the same result (the tests' oracle). Each shard localises them (``start - s·L``,
  ``region - s·R``).
- Text and context tokens may sit on any shard (so decode steps append text anywhere).

A decode loop builds this once: ``gazejax.gaze.shard_layout.shard_layouts`` re-places the
samples' region-major layouts into ``P`` blocks of ``L`` slots, moving a region that would
straddle a boundary to the next shard (padding the gap) and renumbering regions shard-major;
``gazejax.gaze.regions.batch_layouts`` then gives the cache metadata and the
:class:`RegionTable` that ``KVCache.empty`` takes, with ``max_len = P·L``; prefill descriptors
(``routing.region_descriptors``) come out ``[batch, P·R, ...]``. Renumbering keeps the
regions' order, so selections match the unsharded layout's up to the id map.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from kernels.gaze_attention import routing as routing_lib
from kernels.gaze_attention.dispatch import ATTEND_SELECTED
from kernels.gaze_attention.metadata import RegionTable, TokenKind, TokenMeta
from kernels.gaze_attention.reference import masked_softmax
from kernels.gaze_attention.routing import Selection

__all__ = [
    "check_sharded_layout",
    "sharded_dense_decode",
    "sharded_gaze_decode",
    "sharded_region_descriptors",
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
    heads_first: bool = False,
) -> tuple[jax.Array, Selection]:
    """One gaze decode step over a sequence-sharded cache; see the module docstring.

    Args:
      query: [batch, 1, num_heads, head_dim], replicated over ``axis``.
      key, value: [batch, P·L, num_kv_heads, head_dim], sharded along the sequence over
        ``axis`` (``P`` its size); with ``heads_first`` [batch, num_kv_heads, P·L, head_dim]
        (the decoder's cache), each shard's read in place.
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
      implementation: a key of :data:`~kernels.gaze_attention.dispatch.ATTEND_SELECTED`.
      max_unrouted_tokens: xla and pallas: static bound on the text + context slots of a
        sample **on one shard** (text queries only); see ``gaze_attention``.
      heads_first: the layout of ``key`` and ``value`` (above).

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
    num_shards = _check_decode_shapes(query, key, value, mesh, axis, heads_first)
    if table.num_regions % num_shards or table.num_regions == 0:
        raise ValueError(
            f"region slots {table.num_regions} must be a positive multiple of the {num_shards} "
            f"shards of mesh axis {axis!r}"
        )
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    replicated, split = PartitionSpec(batch_axis), PartitionSpec(batch_axis, axis)
    cache = _cache_spec(batch_axis, axis, heads_first)
    args = (query, key, value, query_meta, kv_meta, table)
    specs = (replicated, cache, cache, replicated, split, split)
    if descriptors is not None:
        args, specs = args + (descriptors,), specs + (split,)
    step = functools.partial(
        _shard_step,
        axis=axis,
        top_k=top_k,
        routing=routing,
        scale=scale,
        heads_first=heads_first,
        attend=functools.partial(
            ATTEND_SELECTED[implementation],
            max_unrouted_tokens=max_unrouted_tokens,
            heads_first=heads_first,
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


def _cache_spec(batch_axis, axis: str, heads_first: bool) -> PartitionSpec:
    """How a cache ``[batch, kv_len, kv_heads, d]`` (``heads_first``: ``[batch, kv_heads,
    kv_len, d]``) is split: the batch over ``batch_axis``, the sequence over ``axis``."""
    if heads_first:
        return PartitionSpec(batch_axis, None, axis)
    return PartitionSpec(batch_axis, axis)


def _check_decode_shapes(query, key, value, mesh, axis, heads_first=False) -> int:
    """Raises ValueError unless the shapes are a decode step over ``P | kv_len`` shards of
    mesh axis ``axis``; returns ``P``."""
    if axis not in mesh.shape:
        raise ValueError(f"axis {axis!r} is not a mesh axis {tuple(mesh.shape)}")
    _, q_len, num_heads, head_dim = query.shape
    kv_len, num_kv_heads = key.shape[2:0:-1] if heads_first else key.shape[1:3]
    if (
        q_len != 1
        or key.shape != value.shape
        or key.shape[-1] != head_dim
        or (num_heads % num_kv_heads)
    ):
        raise ValueError(
            f"decode shapes expected: query {query.shape}, key {key.shape}, value {value.shape}"
        )
    num_shards = mesh.shape[axis]
    if kv_len % num_shards:
        raise ValueError(
            f"cache length {kv_len} must be a multiple of the {num_shards} shards of mesh "
            f"axis {axis!r}"
        )
    return num_shards


def _shard_step(
    query,
    key,
    value,
    query_meta,
    kv_meta,
    table,
    descriptors=None,
    *,
    axis,
    top_k,
    routing,
    scale,
    heads_first,
    attend,
):
    """The body under ``shard_map``: local arrays of one shard, global ids in and out."""
    shard = jax.lax.axis_index(axis)
    num_regions = table.num_regions  # R, this shard's region slots
    first_region = shard * num_regions
    kv_meta = _local_regions(kv_meta, first_region)
    kv_len = kv_meta.kind.shape[1]  # L, this shard's slots
    table = table.replace(start=jnp.where(table.length > 0, table.start - shard * kv_len, 0))
    if descriptors is None:
        length_major = jnp.swapaxes(key, 1, 2) if heads_first else key
        descriptors = routing_lib.region_descriptors(length_major, kv_meta, num_regions)

    region, valid = _global_top_k(
        query, descriptors, query_meta, table, first_region, axis=axis, top_k=top_k, routing=routing
    )
    group = query.shape[2] // region.shape[2]
    region, valid = (jnp.repeat(x, group, axis=2) for x in (region, valid))
    local = region - first_region
    mine = valid & (local >= 0) & (local < num_regions)
    out, lse = attend(
        query,
        key,
        value,
        query_meta,
        kv_meta,
        table,
        Selection(jnp.where(mine, local, -1), mine),
        routing=routing,
        scale=scale,
    )

    return _merge_partials(out, lse, axis).astype(query.dtype), Selection(region, valid)


def _local_regions(kv_meta: TokenMeta, first_region) -> TokenMeta:
    """``kv_meta`` of one shard with its global region ids made local (``- first_region``)."""
    return kv_meta.replace(region=jnp.where(kv_meta.region >= 0, kv_meta.region - first_region, -1))


def _merge_partials(out: jax.Array, lse: jax.Array, axis: str) -> jax.Array:
    """The shards' normalised partial outputs ``[b, q, h, d]`` merged by their log-sum-exps
    ``[b, q, h]`` (``-inf``: the shard holds nothing the query sees): float32 ``[b, q, h, d]``.
    One ``pmax`` of ``[b, q, h]`` and one ``psum`` of ``[b, q, h, d + 1]``."""
    peak = jax.lax.pmax(lse, axis)
    weight = jnp.exp(lse - jnp.where(jnp.isfinite(peak), peak, 0.0))[..., None]  # 0 if unseen
    merged = jax.lax.psum(jnp.concatenate([out * weight, weight], axis=-1), axis)
    total = merged[..., -1:]
    return merged[..., :-1] / jnp.where(total > 0, total, 1.0)


def sharded_dense_decode(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array,
    *,
    mesh: jax.sharding.Mesh,
    axis: str = "sequence",
    batch_axis: str | tuple[str, ...] | None = None,
    scale: float | None = None,
    heads_first: bool = False,
) -> jax.Array:
    """Dense attention of one decode step over a cache sharded along its sequence over ``axis``:
    each shard attends to its own slots, the partial results merge by log-sum-exp as in
    :func:`sharded_gaze_decode` (the dense baseline scales the same way; no layout contract).

    Args:
      query: [batch, 1, num_heads, head_dim], replicated over ``axis``.
      key, value: [batch, P·L, num_kv_heads, head_dim], sharded along the sequence; with
        ``heads_first`` [batch, num_kv_heads, P·L, head_dim], read in place.
      mask: bool [batch, 1, P·L], True where the query sees the slot (sharded like ``key``).
      mesh, axis, batch_axis: as :func:`sharded_gaze_decode`.
      scale: logit scale; default ``1 / sqrt(head_dim)``.
      heads_first: the layout of ``key`` and ``value`` (above).

    Returns:
      [batch, 1, num_heads, head_dim] in ``query.dtype``, replicated over ``axis``; zeros where
      the query sees nothing.
    """
    _check_decode_shapes(query, key, value, mesh, axis, heads_first)
    if mask.shape != (query.shape[0], 1, key.shape[2 if heads_first else 1]):
        raise ValueError(f"mask {mask.shape} must be [batch, 1, kv_len] of key {key.shape}")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    replicated = PartitionSpec(batch_axis)
    cache = _cache_spec(batch_axis, axis, heads_first)

    def step(query, key, value, mask):
        mask = jnp.broadcast_to(mask[:, :, None, :], (*query.shape[:3], mask.shape[-1]))
        out, lse = masked_softmax(query, key, value, mask, scale, heads_first)
        return _merge_partials(out, lse, axis).astype(query.dtype)

    return jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(replicated, cache, cache, PartitionSpec(batch_axis, None, axis)),
        out_specs=replicated,
        check_vma=False,  # replication after psum is not statically checked (see above)
    )(query, key, value, mask)


def sharded_region_descriptors(
    key: jax.Array,
    kv_meta: TokenMeta,
    num_regions: int,
    *,
    mesh: jax.sharding.Mesh,
    axis: str = "sequence",
    batch_axis: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """Region descriptors of a cache in the sharded layout, each shard's from its own keys.

    Args:
      key: [batch, P·L, num_kv_heads, head_dim] keys as cached, sharded along the sequence.
      kv_meta: [batch, P·L] metadata (global, shard-major region ids), sharded like ``key``.
      num_regions: ``P·R`` region slots.
      mesh, axis, batch_axis: as :func:`sharded_gaze_decode`.

    Returns:
      float32 [batch, P·R, num_kv_heads, head_dim], sharded along the regions over ``axis``;
      equal to ``routing.region_descriptors(key, kv_meta, num_regions)``. No communication.
    """
    num_shards = mesh.shape[axis]
    if key.shape[1] % num_shards or num_regions % num_shards:
        raise ValueError(
            f"cache length {key.shape[1]} and region slots {num_regions} must be multiples of "
            f"the {num_shards} shards of mesh axis {axis!r}"
        )
    local_regions = num_regions // num_shards

    def step(key, kv_meta):
        first_region = jax.lax.axis_index(axis) * local_regions
        local = _local_regions(kv_meta, first_region)
        return routing_lib.region_descriptors(key, local, local_regions)

    split = PartitionSpec(batch_axis, axis)
    return jax.shard_map(step, mesh=mesh, in_specs=(split, split), out_specs=split)(key, kv_meta)


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


def check_sharded_layout(kv_meta: TokenMeta, table: RegionTable, num_shards: int) -> None:
    """Raises ValueError unless concrete ``kv_meta``/``table`` follow the layout contract.

    ``kv_meta``: [batch, P·L]; ``table``: [batch, P·R]; ``num_shards``: ``P``.
    """
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
    if (
        used & ((start // shard_length != owner) | ((start + length - 1) // shard_length != owner))
    ).any():
        raise ValueError("a region straddles shards or lies outside the shard owning its id")
    visual = kind == TokenKind.VISUAL
    slot_shard = np.broadcast_to(np.arange(kv_len) // shard_length, kind.shape)
    if (visual & (np.maximum(region, 0) // regions_per_shard != slot_shard)).any():
        raise ValueError("a visual token lies outside the shard owning its region id")

"""The gaze attention op: routing once, then one implementation attends to the selection.

:func:`gaze_attention` validates its inputs, takes the region descriptors (given, or the means
of ``key`` per region), selects every text query's top-K regions once
(:func:`routing.select_regions`) and hands the selection to an implementation from
:data:`ATTEND_SELECTED`. Every implementation is an ``attend_selected_*`` with one signature::

    (query, key, value, query_meta, kv_meta, table, selection, *, routing, scale,
     max_unrouted_tokens=None) -> (out [b, q, h, d], lse [b, q, h] float32)

(``out`` normalised, float32 or the query's dtype; ``out = 0`` and ``lse = -inf`` where a query
head sees nothing), so the sequence-sharded decode (``sharded.py``) merges any of them by
log-sum-exp. Registering another implementation is one line in :data:`ATTEND_SELECTED`. Every decode
(``q_len == 1``) also takes ``heads_first`` (keys and values ``[b, kv_heads, kv_len, d]``, the
decoder's cache) and reads it in place; many queries take length-major keys and values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

from kernels.gaze_attention import routing as routing_lib
from kernels.gaze_attention.metadata import RegionTable, TokenMeta, region_table
from kernels.gaze_attention.pallas_decode import attend_selected_pallas_decode
from kernels.gaze_attention.pallas_train import attend_selected_pallas_train
from kernels.gaze_attention.platform import target_platform
from kernels.gaze_attention.reference import attend_selected_reference
from kernels.gaze_attention.routing import Selection
from kernels.gaze_attention.xla import attend_selected_xla

Implementation = Literal["reference", "xla", "pallas", "auto"]
AttendSelected = Callable[..., tuple[jax.Array, jax.Array]]


def attend_selected_pallas(
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
    """The Pallas kernels with their defaults: decode when ``q_len == 1`` (``heads_first``:
    the cache as :func:`gaze_attention` takes it), else the flash training kernel (length-major
    keys), on Mosaic on TPU, Triton on GPU, the interpreter on CPU."""
    if query.shape[1] == 1:
        attend = functools.partial(attend_selected_pallas_decode, heads_first=heads_first)
    elif heads_first:
        raise ValueError("the Pallas training kernel takes length-major keys and values")
    else:
        attend = attend_selected_pallas_train
    return attend(
        query,
        key,
        value,
        query_meta,
        kv_meta,
        table,
        selection,
        routing=routing,
        scale=scale,
        max_unrouted_tokens=max_unrouted_tokens,
    )


# ``"reference"``: masked dense attention from per-token metadata, the oracle. ``"xla"``: decode
# reads only the text/context tokens and the selected regions; many queries run blockwise,
# differentiable. ``"pallas"``: the Pallas kernels (on CPU interpreted: correct but slow, tests).
ATTEND_SELECTED: dict[str, AttendSelected] = {
    "reference": attend_selected_reference,
    "xla": attend_selected_xla,
    "pallas": attend_selected_pallas,
}
IMPLEMENTATIONS: tuple[str, ...] = (*ATTEND_SELECTED, "auto")


def resolve_implementation(implementation: Implementation) -> str:
    """``"auto"`` → the Pallas kernels on a GPU or TPU (the mesh's platform,
    ``platform.target_platform``), ``"xla"`` on a CPU (where Pallas only interprets); any other
    name is itself (checked)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        return "pallas" if target_platform() in ("gpu", "tpu") else "xla"
    return implementation


def gaze_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    query_meta: TokenMeta,
    kv_meta: TokenMeta,
    regions: RegionTable,
    *,
    top_k: int,
    descriptors: jax.Array | None = None,
    routing: routing_lib.Routing = "per_head",
    scale: float | None = None,
    implementation: Implementation = "reference",
    max_unrouted_tokens: int | None = None,
    return_selection: bool = False,
    heads_first: bool = False,
) -> jax.Array | tuple[jax.Array, Selection]:
    """Gaze attention of ``query`` over a (region-major) sequence or KV cache.

    Who sees what: a text query sees earlier text, the context tokens of earlier units and the
    tokens of its top-K regions (eq. 2) among regions wholly before it; a visual query sees every
    earlier token; a context query sees its own unit's visual tokens and the unit's context
    tokens up to itself. Padding sees and is seen by nothing; queries that see nothing output 0.

    Args:
      query: [batch, q_len, num_heads, head_dim]. ``q_len == 1`` is a decode step.
      key: [batch, kv_len, num_kv_heads, head_dim], as cached (after RoPE); ``num_heads`` a
        multiple of ``num_kv_heads``.
      value: [batch, kv_len, num_kv_heads, head_dim].
      query_meta: [batch, q_len] metadata of the queries (their kind, unit and position).
      kv_meta: [batch, kv_len] metadata of the keys.
      regions: [batch, num_regions] region table of the cache (``num_regions`` and the static
        region capacity ``m`` come from it). The reference recomputes it from ``kv_meta``.
      top_k: K, regions per text query (per head, or per GQA group when shared).
      descriptors: [batch, num_regions, num_kv_heads, head_dim] precomputed region
        descriptors (e.g. kept in the decode cache); default: means of ``key`` per region,
        which reads the whole cache (decode should pass them). No gradient flows into them.
      routing: ``"per_head"`` (every query head selects) or ``"shared"`` (one selection per
        GQA group from the sum of its heads' scores).
      scale: logit scale; default ``1 / sqrt(head_dim)``.
      implementation: a key of :data:`ATTEND_SELECTED`, or ``"auto"`` (Pallas on a GPU/TPU,
        ``"xla"`` on a CPU: :func:`resolve_implementation`).
      max_unrouted_tokens: xla and pallas decode only: static bound on the text + context
        tokens of a sample; with it decode reads just those and the selected regions (text
        queries only), without it decode reads the whole cache outside the regions.
      return_selection: also return the :class:`Selection` (where each query head looked).
      heads_first: ``key`` and ``value`` are head-major, ``[batch, num_kv_heads, kv_len,
        head_dim]`` (the decoder's cache). Every decode (``q_len == 1``) reads them in place;
        many queries get them transposed to the length-major layout above.

    Returns:
      [batch, q_len, num_heads, head_dim] in ``query.dtype``; with ``return_selection``, also
      ``Selection`` of [batch, q_len, num_heads, top_k] region ids and validity.
    """
    routing_lib.validate_top_k(top_k)
    routing_lib.validate_routing(routing)
    implementation = resolve_implementation(implementation)
    if heads_first and query.shape[1] > 1:
        key, value = (jnp.swapaxes(x, 1, 2) for x in (key, value))
        heads_first = False
    num_heads, head_dim = query.shape[2:]
    num_kv_heads = key.shape[1 if heads_first else 2]
    if key.shape != value.shape or key.shape[-1] != head_dim or num_heads % num_kv_heads:
        raise ValueError(
            f"incompatible shapes: query {query.shape}, key {key.shape}, value {value.shape}"
        )
    scale = head_dim**-0.5 if scale is None else scale
    if implementation == "reference":  # layout-agnostic: extents from the metadata
        regions = region_table(kv_meta, regions.num_regions, regions.capacity)
    if descriptors is None:
        length_major = jnp.swapaxes(key, 1, 2) if heads_first else key
        descriptors = routing_lib.region_descriptors(length_major, kv_meta, regions.num_regions)
    allowed = routing_lib.routable(query_meta, regions)
    selection = routing_lib.select_regions(
        query, descriptors, allowed, top_k=top_k, routing=routing
    )
    out, _ = ATTEND_SELECTED[implementation](
        query,
        key,
        value,
        query_meta,
        kv_meta,
        regions,
        selection,
        routing=routing,
        scale=scale,
        max_unrouted_tokens=max_unrouted_tokens,
        heads_first=heads_first,
    )
    out = out.astype(query.dtype)
    return (out, selection) if return_selection else out

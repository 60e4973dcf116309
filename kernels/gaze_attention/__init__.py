"""The gaze attention op (paper eq. 2–4; DESIGN.md §2–§4).

One function, several implementations with identical semantics:

- ``"reference"``: masked dense attention from per-token metadata; the oracle.
- ``"xla"``: decode (``q_len == 1``) reads only the text/context tokens and the selected
  regions; many queries (prefill, training) run blockwise over queries, differentiable.
- ``"pallas"``: Pallas kernels (``pallas_decode.py`` for ``q_len == 1``, ``pallas_train.py``
  flash forward + backward for many queries): Mosaic on TPU, Triton on GPU, the Pallas
  interpreter on CPU (correct but slow: tests only).

:func:`sharded_gaze_decode` runs a decode step over a KV cache sharded along its sequence axis
(``sharded.py``), with any of these implementations.
"""

from __future__ import annotations

from typing import Literal

import jax

from gazejax.gaze import routing as routing_lib
from gazejax.gaze.regions import RegionTable, TokenMeta
from gazejax.gaze.routing import Selection
from kernels.gaze_attention.pallas_decode import gaze_decode_pallas
from kernels.gaze_attention.pallas_train import gaze_attention_pallas_train
from kernels.gaze_attention.reference import gaze_attention_reference
from kernels.gaze_attention.sharded import sharded_gaze_decode
from kernels.gaze_attention.xla import gaze_attention_xla

Implementation = Literal["reference", "xla", "pallas"]
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "xla", "pallas")

__all__ = ["IMPLEMENTATIONS", "Selection", "gaze_attention", "sharded_gaze_decode"]


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
      implementation: ``"reference"``, ``"xla"`` or ``"pallas"`` (on CPU the Pallas kernels run
        in interpret mode: slow, for tests).
      max_unrouted_tokens: xla and pallas decode only: static bound on the text + context
        tokens of a sample; with it decode reads just those and the selected regions (text
        queries only), without it decode reads the whole cache outside the regions.
      return_selection: also return the :class:`Selection` (where each query head looked).

    Returns:
      [batch, q_len, num_heads, head_dim] in ``query.dtype``; with ``return_selection``, also
      ``Selection`` of [batch, q_len, num_heads, top_k] region ids and validity.
    """
    routing_lib.validate_top_k(top_k)
    routing_lib.validate_routing(routing)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    num_heads, head_dim = query.shape[2:]
    if key.shape != value.shape or key.shape[-1] != head_dim or num_heads % key.shape[2]:
        raise ValueError(
            f"incompatible shapes: query {query.shape}, key {key.shape}, value {value.shape}"
        )
    scale = head_dim**-0.5 if scale is None else scale
    options = dict(top_k=top_k, routing=routing, scale=scale)
    if implementation == "reference":
        out, selection = gaze_attention_reference(
            query, key, value, query_meta, kv_meta, regions.num_regions, descriptors, **options
        )
    else:
        if descriptors is None:
            descriptors = routing_lib.region_descriptors(key, kv_meta, regions.num_regions)
        args = (query, key, value, query_meta, kv_meta, regions, descriptors)
        if implementation == "xla":
            out, selection = gaze_attention_xla(
                *args, max_unrouted_tokens=max_unrouted_tokens, **options
            )
        elif query.shape[1] == 1:
            out, selection = gaze_decode_pallas(
                *args, max_unrouted_tokens=max_unrouted_tokens, **options
            )
        else:
            out, selection = gaze_attention_pallas_train(*args, **options)
    return (out, selection) if return_selection else out

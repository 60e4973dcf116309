"""Reference gaze attention: masked dense attention built from per-token metadata.

Layout-agnostic (storage order does not matter: the mask comes from kinds, units, positions and
region ids; the dispatcher recomputes region extents from the metadata for it) and materialises
``[batch, heads, q_len, kv_len]``: the oracle that every other implementation is tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.gaze_attention import routing as routing_lib
from kernels.gaze_attention.metadata import RegionTable, TokenMeta, visibility


def selected_tokens(selection: routing_lib.Selection, kv_region: jax.Array, num_regions: int):
    """[batch, q_len, num_heads, kv_len] bool: key ``kv_region`` is among the selected regions.

    ``kv_region``: [batch, kv_len] region of each key (``-1`` for non-visual).
    """
    return tokens_in_regions(chosen_regions(selection, num_regions), kv_region)


def chosen_regions(selection: routing_lib.Selection, num_regions: int) -> jax.Array:
    """[batch, q_len, num_heads, num_regions] bool: the query head selected the region."""
    region_ids = jnp.arange(num_regions, dtype=jnp.int32)
    chosen = selection.valid[..., None] & (selection.region[..., None] == region_ids)
    return chosen.any(axis=-2)


def tokens_in_regions(chosen: jax.Array, kv_region: jax.Array) -> jax.Array:
    """[batch, q_len, num_heads, kv_len] bool: key ``kv_region [batch, kv_len]`` lies in a region
    that ``chosen [batch, q_len, num_heads, num_regions]`` marks (``-1``: not visual)."""
    index = jnp.clip(kv_region, 0, chosen.shape[-1] - 1)[:, None, None, :]
    return jnp.take_along_axis(chosen, index, axis=-1) & (kv_region >= 0)[:, None, None, :]


def masked_softmax(
    query, key, value, mask, scale: float, heads_first: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Softmax attention under ``mask``, in float32, with the log-sum-exp of the visible logits.

    Shapes: query [batch, q_len, num_heads, head_dim], key/value [batch, kv_len, num_kv_heads,
    head_dim] (``heads_first``: [batch, num_kv_heads, kv_len, head_dim]), mask [batch, q_len,
    num_heads, kv_len]. Returns ``(out [batch, q_len, num_heads, head_dim], lse [batch, q_len,
    num_heads])``, both float32; fully masked rows give ``out = 0`` and ``lse = -inf`` (and
    finite gradients).
    """
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1 if heads_first else 2]
    group = num_heads // num_kv_heads
    q = query.reshape(batch, q_len, num_kv_heads, group, head_dim)
    mask = mask.reshape(batch, q_len, num_kv_heads, group, -1)
    keys = "bkld" if heads_first else "blkd"
    logits = jnp.einsum(f"bqkgd,{keys}->bqkgl", q, key, preferred_element_type=jnp.float32)
    logits = logits * scale
    peak = jax.lax.stop_gradient(jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1))
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.exp(jnp.where(mask, logits - peak[..., None], -jnp.inf))
    total = weights.sum(axis=-1, keepdims=True)
    probs = weights / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum(f"bqkgl,{keys}->bqkgd", probs, value.astype(jnp.float32))
    total = total[..., 0]
    lse = jnp.where(total > 0, peak + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    return out.reshape(batch, q_len, num_heads, head_dim), lse.reshape(batch, q_len, num_heads)


def attend_selected_reference(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    query_meta: TokenMeta,
    kv_meta: TokenMeta,
    table: RegionTable,
    selection: routing_lib.Selection,
    *,
    routing: routing_lib.Routing,
    scale: float,
    max_unrouted_tokens: int | None = None,
    heads_first: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Masked dense attention given the regions each query head selected.

    Args:
      query: [batch, q_len, num_heads, head_dim] (``q_len == 1`` for decode; any works).
      key, value: [batch, kv_len, num_kv_heads, head_dim]; with ``heads_first`` [batch,
        num_kv_heads, kv_len, head_dim].
      query_meta: [batch, q_len]; kv_meta: [batch, kv_len] metadata (``kv_meta.region`` indexes
        ``table``).
      table: [batch, num_regions]; only ``num_regions`` is read.
      selection: [batch, q_len, num_heads, top_k] regions of ``table`` and their validity.
      routing, max_unrouted_tokens: unused here (the selection is already per head; the dense
        mask reads the whole cache); accepted for a signature shared by every implementation.
      scale: logit scale.
      heads_first: the layout of ``key`` and ``value`` (above).

    Returns:
      ``(out [batch, q_len, num_heads, head_dim], lse [batch, q_len, num_heads])`` float32,
      ``out`` normalised; ``out = 0`` and ``lse = -inf`` where the query sees nothing.
    """
    del routing, max_unrouted_tokens
    selected = selected_tokens(selection, kv_meta.region, table.num_regions)
    mask = visibility(query_meta, kv_meta, selected)
    return masked_softmax(query, key, value, mask, scale, heads_first)

"""Visual routing (paper eq. 2): region descriptors, scores and the exact top-K selection.

A text query at position ``p`` scores every region ``g`` that lies wholly before it
(``last_position < p``) by ``s_g = q · d_g``, ``d_g`` being the mean of the region's cached keys,
and attends to the top-K of them over all earlier units jointly. Scores are float32 and
stop-gradient: the selection is discrete, gradients reach the selected keys and values only
through the attention, never through descriptors or scores.

Ties: among equal scores the lower region index wins (``lax.top_k`` order). With fewer than K
selectable regions all are taken and the remaining slots are marked invalid.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

from kernels.gaze_attention.metadata import RegionTable, TokenKind, TokenMeta

Routing = Literal["per_head", "shared"]
ROUTINGS: tuple[str, ...] = ("per_head", "shared")


@struct.dataclass
class Selection:
    """The regions each query head attends to.

    Attributes:
      region: [batch, q_len, num_heads, top_k] int32 region indices, ``-1`` where not valid.
      valid: [batch, q_len, num_heads, top_k] bool; false for unused slots (fewer than K
        selectable regions) and for queries that do not route (visual, context, padding).
    """

    region: jax.Array
    valid: jax.Array


def validate_top_k(top_k: int) -> int:
    """Raises ValueError naming ``top_k`` unless it is an integer >= 1."""
    if int(top_k) != top_k or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k}")
    return int(top_k)


def validate_routing(routing: str) -> str:
    """Raises ValueError naming ``routing`` unless it is one of :data:`ROUTINGS`."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    return routing


def region_descriptors(
    key: jax.Array,
    kv_meta: TokenMeta,
    num_regions: int,
    previous: jax.Array | None = None,
) -> jax.Array:
    """Mean of each region's keys over its real tokens (stop-gradient).

    Args:
      key: [batch, kv_len, num_kv_heads, head_dim] keys as cached.
      kv_meta: metadata of ``key``'s slots.
      num_regions: static number of region slots.
      previous: optional float32 [batch, num_regions, num_kv_heads, head_dim] descriptors of
        earlier tokens (a chunked prefill): regions with no token in ``key`` keep them. Each
        region must then lie wholly in one chunk.

    Returns:
      [batch, num_regions, num_kv_heads, head_dim] float32; zeros for empty regions (or
      ``previous``'s rows).
    """
    key = jax.lax.stop_gradient(key).astype(jnp.float32)
    visual = kv_meta.kind == TokenKind.VISUAL
    segment = jnp.where(visual, kv_meta.region, num_regions)

    def per_sample(key, segment):
        total = jax.ops.segment_sum(key, segment, num_segments=num_regions + 1)
        count = jax.ops.segment_sum(jnp.ones_like(segment), segment, num_regions + 1)
        return total[:num_regions] / jnp.maximum(count[:num_regions], 1)[:, None, None], count

    descriptors, count = jax.vmap(per_sample)(key, segment)
    if previous is None:
        return descriptors
    present = (count[:, :num_regions] > 0)[..., None, None]
    return jnp.where(present, descriptors, previous)


def routable(query_meta: TokenMeta, table: RegionTable) -> jax.Array:
    """[batch, q_len, num_regions] bool: text queries × non-empty regions wholly before them."""
    is_text = (query_meta.kind == TokenKind.TEXT)[..., None]
    earlier = table.last_position[:, None, :] < query_meta.position[..., None]
    return is_text & earlier & (table.length > 0)[:, None, :]


def region_scores(query: jax.Array, descriptors: jax.Array, routing: Routing) -> jax.Array:
    """Routing scores ``s_g = q · d_g`` in float32 (stop-gradient).

    Args:
      query: [batch, q_len, num_heads, head_dim].
      descriptors: [batch, num_regions, num_kv_heads, head_dim].
      routing: ``"per_head"`` scores per query head; ``"shared"`` sums the scores of the query
        heads of each GQA group.

    Returns:
      [batch, q_len, num_heads or num_kv_heads, num_regions] float32.
    """
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = descriptors.shape[2]
    q = jax.lax.stop_gradient(query).astype(jnp.float32)
    q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    d = jax.lax.stop_gradient(descriptors).astype(jnp.float32)
    scores = jnp.einsum("bqkgd,brkd->bqkgr", q, d, precision=jax.lax.Precision.HIGHEST)
    if routing == "shared":
        return scores.sum(axis=3)
    return scores.reshape(batch, q_len, num_heads, -1)


def select_regions(
    query: jax.Array,
    descriptors: jax.Array,
    allowed: jax.Array,
    *,
    top_k: int,
    routing: Routing,
) -> Selection:
    """Exact top-K regions per query head (or per GQA group, broadcast to its heads).

    Args:
      query: [batch, q_len, num_heads, head_dim].
      descriptors: [batch, num_regions, num_kv_heads, head_dim].
      allowed: [batch, q_len, num_regions] bool, from :func:`routable`.
      top_k: K; may exceed the number of regions (extra slots are invalid).
      routing: ``"per_head"`` or ``"shared"``.
    """
    scores = region_scores(query, descriptors, routing)
    allowed = jnp.broadcast_to(allowed[:, :, None, :], scores.shape)
    k = min(top_k, scores.shape[-1])
    _, region = jax.lax.top_k(jnp.where(allowed, scores, -jnp.inf), k)
    valid = jnp.take_along_axis(allowed, region, axis=-1)
    pad = [(0, 0)] * 3 + [(0, top_k - k)]
    region = jnp.pad(jnp.where(valid, region, -1), pad, constant_values=-1)
    valid = jnp.pad(valid, pad)
    group = query.shape[2] // scores.shape[2]
    return Selection(jnp.repeat(region, group, axis=2), jnp.repeat(valid, group, axis=2))

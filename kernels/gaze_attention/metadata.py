"""The op's token contract: what each KV slot holds (kinds, metadata), where regions sit, and
who may see whom (DESIGN.md §2).

Visual tokens are *stored* region-major (a region is one contiguous slice of the KV cache) while
their *position ids* keep raster order, so every mask is defined on positions and kinds, never
on storage order. These pytrees are what every implementation of the op reads; building them
from a sample's segments is the caller's business (``gazejax.gaze.regions``).
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
from flax import struct


class TokenKind(enum.IntEnum):
    """What a token (or a KV-cache slot) holds."""

    PADDING = -1
    TEXT = 0
    VISUAL = 1
    CONTEXT = 2


@struct.dataclass
class TokenMeta:
    """Per-token metadata of a (padded) sequence or KV cache; a pytree of int32 arrays.

    Attributes:
      kind: [batch, length] :class:`TokenKind` values (``-1`` padding / empty cache slot).
      unit: [batch, length] visual unit (image or frame) of visual and context tokens, ``-1``
        for text and padding.
      region: [batch, length] region index within the sample for visual tokens, else ``-1``.
      position: [batch, length] raster-order position id (the causal order), ``-1`` for padding.
    """

    kind: jax.Array
    unit: jax.Array
    region: jax.Array
    position: jax.Array

    @property
    def valid(self) -> jax.Array:
        """[batch, length] bool: a real token (not padding)."""
        return self.kind != TokenKind.PADDING


@struct.dataclass
class RegionTable:
    """Where every region sits in the KV cache; a pytree of int32 arrays.

    Attributes:
      start: [batch, num_regions] cache slot of the region's first token.
      length: [batch, num_regions] tokens in the region (its slots are ``start + [0, length)``);
        ``0`` for region slots a sample does not use.
      last_position: [batch, num_regions] largest position id in the region; a query at
        position ``p`` may select the region only if ``last_position < p``.
      capacity: static ``m``, the most tokens a region holds.
    """

    start: jax.Array
    length: jax.Array
    last_position: jax.Array
    capacity: int = struct.field(pytree_node=False)

    @property
    def num_regions(self) -> int:
        return self.start.shape[-1]


def region_table(kv_meta: TokenMeta, num_regions: int, capacity: int) -> RegionTable:
    """The :class:`RegionTable` of a cache, computed from its metadata (jittable).

    Assumes, as ``gazejax.gaze.regions.build_layout`` guarantees, that each region's tokens
    are contiguous.
    """
    visual = kv_meta.kind == TokenKind.VISUAL
    segment = jnp.where(visual, kv_meta.region, num_regions)
    slot = jnp.broadcast_to(jnp.arange(segment.shape[-1], dtype=jnp.int32), segment.shape)

    def per_sample(segment, slot, position, visual):
        def reduce(op, values, fill):
            out = op(jnp.where(visual, values, fill), segment, num_segments=num_regions + 1)
            return out[:num_regions]

        length = reduce(jax.ops.segment_sum, jnp.ones_like(slot), 0)
        start = jnp.where(length > 0, reduce(jax.ops.segment_min, slot, 0), 0)
        last = jnp.where(length > 0, reduce(jax.ops.segment_max, position, -1), -1)
        return start, length, last

    start, length, last = jax.vmap(per_sample)(segment, slot, kv_meta.position, visual)
    return RegionTable(start, length, last, capacity=capacity)


def visibility(query_meta: TokenMeta, kv_meta: TokenMeta, selected: jax.Array) -> jax.Array:
    """Who sees what (DESIGN.md §2), as a mask.

    Args:
      query_meta: [batch, q_len] metadata of the queries.
      kv_meta: [batch, kv_len] metadata of the keys.
      selected: [batch, q_len, num_heads, kv_len] bool, key lies in a region the query head
        selected (only read for text queries).

    Returns:
      [batch, q_len, num_heads, kv_len] bool.
    """
    q = jax.tree.map(lambda x: x[:, :, None, None], query_meta)
    k = jax.tree.map(lambda x: x[:, None, None, :], kv_meta)
    causal = k.position <= q.position
    text_sees = causal & ((k.kind == TokenKind.TEXT) | (k.kind == TokenKind.CONTEXT))
    text_sees = text_sees | ((k.kind == TokenKind.VISUAL) & selected)
    context_sees = (k.unit == q.unit) & (
        (k.kind == TokenKind.VISUAL) | ((k.kind == TokenKind.CONTEXT) & causal)
    )
    sees = jnp.select(
        [q.kind == TokenKind.TEXT, q.kind == TokenKind.VISUAL, q.kind == TokenKind.CONTEXT],
        [text_sees, causal, context_sees],
        False,
    )
    return sees & q.valid & k.valid

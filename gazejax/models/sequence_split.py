"""Decode over a KV cache split along its sequence: which mesh axis splits it, and the step.

Under ``jax.set_mesh(mesh)`` and ``nn.logical_axis_rules(rules)``, the cache's length axis
(logical name ``cache_length``) lives on the mesh axis the rules map it to (``sequence`` by
default, :mod:`gazejax.sharding`). When that axis has more than one device, the decoder's
one-token steps over the cache run ``kernels.gaze_attention.sharded`` under ``jax.shard_map``:
gaze steps agree on the exact global top-K from each shard's local candidates and merge the
shards' partial attention by log-sum-exp (:func:`sharded_gaze_decode`), dense steps merge the
same way (:func:`sharded_dense_decode`), and the prefill computes each shard's region
descriptors from its own keys (:func:`sharded_region_descriptors`). Keys and values never
leave their shard. The cache must be in the ``gazejax.gaze.shard_layout`` layout (regions
whole on a shard, ids shard-major), which ``gazejax.inference.sequence_parallel`` builds.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import flax.linen as nn
import jax

from kernels.gaze_attention import (
    Selection,
    resolve_implementation,
    sharded_dense_decode,
    sharded_gaze_decode,
    sharded_region_descriptors,
)

if TYPE_CHECKING:
    from gazejax.models.decoder import AttentionInputs, DecoderConfig

BATCH_AXIS, CACHE_LENGTH_AXIS = "batch", "cache_length"
"""The logical names of the cache's first two axes (``decoder.CACHE_AXES``)."""


@dataclasses.dataclass(frozen=True)
class SequenceSplit:
    """Where a cache's sequence is split: ``mesh`` (the current, abstract one), its ``axis``
    of ``num_shards`` devices, and the mesh axes of the batch (``batch_axis``)."""

    mesh: jax.sharding.AbstractMesh
    axis: str
    batch_axis: str | tuple[str, ...] | None

    @property
    def num_shards(self) -> int:
        return self.mesh.shape[self.axis]

    @property
    def options(self) -> dict:
        """The keyword arguments every ``kernels.gaze_attention.sharded`` function takes."""
        return dict(mesh=self.mesh, axis=self.axis, batch_axis=self.batch_axis)


def current_sequence_split() -> SequenceSplit | None:
    """The split of a cache under the current mesh and logical axis rules; None when the cache
    is whole on each device (no mesh, or its sequence axis has one device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    batch_axis, axis = nn.logical_to_mesh_axes((BATCH_AXIS, CACHE_LENGTH_AXIS))
    if isinstance(axis, tuple):
        raise ValueError(f"logical axis {CACHE_LENGTH_AXIS!r} must map to one mesh axis: {axis}")
    if axis is None or mesh.shape[axis] == 1:
        return None
    return SequenceSplit(mesh, axis, batch_axis)


def split_descriptors(
    split: SequenceSplit, keys: jax.Array, inputs: AttentionInputs, max_len: int
) -> jax.Array:
    """A prefill's region descriptors ``[batch, P·R, kv_heads, head_dim]``, each shard's from
    its own ``keys [batch, P·L, kv_heads, head_dim]`` (the new tokens fill the cache)."""
    if keys.shape[1] != max_len:
        raise ValueError(
            f"a cache split along its sequence is prefilled in one call of all its {max_len} "
            f"slots, got {keys.shape[1]}"
        )
    return sharded_region_descriptors(
        keys, inputs.query_meta, inputs.regions.num_regions, **split.options
    )


def split_decode_step(
    split: SequenceSplit,
    config: DecoderConfig,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    inputs: AttentionInputs,
    descriptors: jax.Array | None,
) -> tuple[jax.Array, Selection | None]:
    """One decode step's attention ``[batch, 1, heads, head_dim]`` over the split cache ``k``,
    ``v`` ``[batch, kv_heads, P·L, head_dim]`` (head-major, each shard's read in place), and
    gaze's :class:`Selection` (global region ids; None for dense attention)."""
    if config.attention == "dense":
        return sharded_dense_decode(q, k, v, inputs.mask, heads_first=True, **split.options), None
    return sharded_gaze_decode(
        q,
        k,
        v,
        inputs.query_meta,
        inputs.kv_meta,
        inputs.regions,
        descriptors,
        top_k=inputs.top_k,
        routing=config.gaze_routing,
        implementation=resolve_implementation(config.gaze_implementation),
        max_unrouted_tokens=inputs.max_unrouted_tokens,
        heads_first=True,
        **split.options,
    )

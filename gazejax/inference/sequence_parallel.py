"""Decoding with the KV cache split along its sequence over a mesh axis (a long video's cache
over several chips).

:func:`shard_prompt` re-lays a packed prompt out for ``P`` shards of ``L`` cache slots
(:func:`gazejax.gaze.shard_layout.shard_layouts`: regions whole on one shard, region ids
shard-major), with room after the prompt for the answer. Under :func:`decode_mesh`'s mesh and
the logical axis rules (``cache_length`` → ``sequence``), the prefill writes that layout into a
cache sharded along its length, each shard computing its own regions' descriptors, and every
decode step runs ``kernels.gaze_attention.sharded`` (:mod:`gazejax.models.sequence_split`).
Selections come back in the unsharded prompt's region ids
(:meth:`ShardedPrompt.original_regions`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from gazejax.gaze.inputs import MultimodalInputs
from gazejax.gaze.regions import SequenceLayout, batch_layouts, region_extents
from gazejax.gaze.shard_layout import shard_layouts
from gazejax.inference.prompts import Prompt
from gazejax.sharding import MESH_AXES
from kernels.gaze_attention import TokenKind

SEQUENCE_AXIS = MESH_AXES[-1]


@dataclasses.dataclass(frozen=True)
class ShardedPrompt:
    """A prompt laid out for a cache of ``num_shards`` blocks.

    Attributes:
      prompt: the re-laid-out :class:`Prompt`: ``length = P·L`` slots (the cache's), regions
        shard-major; its slots from ``free_slot`` on are empty, room for the answer.
      free_slot: the cache slot of the first generated token.
      region_ids: int ``[P·R]``: each shard-major region id's id in the unsharded prompt
        (``-1``: an empty region slot).
    """

    prompt: Prompt
    free_slot: int
    region_ids: np.ndarray

    def original_regions(self, selection: np.ndarray) -> np.ndarray:
        """``selection`` (region ids, ``-1`` none) in the unsharded prompt's ids."""
        return np.where(selection >= 0, self.region_ids[np.maximum(selection, 0)], -1)


def decode_shards(mesh: jax.sharding.Mesh) -> int:
    """The number of shards a decode splits the cache into on ``mesh`` (its sequence axis).

    Raises ValueError unless every other mesh axis has one device (decoding is batch 1 and
    keeps the parameters whole on each device).
    """
    others = {name: size for name, size in mesh.shape.items() if name != SEQUENCE_AXIS}
    if SEQUENCE_AXIS not in mesh.shape or any(size != 1 for size in others.values()):
        raise ValueError(
            f"decoding splits the KV cache over the mesh axis {SEQUENCE_AXIS!r} only; other "
            f"axes must have size 1, got mesh {dict(mesh.shape)} (e.g. --mesh sequence=8)"
        )
    return mesh.shape[SEQUENCE_AXIS]


def shard_with_room(layout: SequenceLayout, num_shards: int, room: int) -> SequenceLayout:
    """``layout`` followed by ``room`` empty slots, placed in ``num_shards`` blocks by
    :func:`~gazejax.gaze.shard_layout.shard_layouts` (the empty slots stay contiguous: next
    fit never leaves a gap before a one-slot atom)."""
    columns = [
        np.pad(x, (0, room), constant_values=-1)
        for x in (layout.kind, layout.unit, layout.region, layout.position)
    ]
    padded = dataclasses.replace(
        layout, kind=columns[0], unit=columns[1], region=columns[2], position=columns[3]
    )
    (sharded,) = shard_layouts([padded], num_shards)
    return sharded


def shard_prompt(prompt: Prompt, num_shards: int, room: int) -> ShardedPrompt:
    """``prompt`` (batch 1) re-laid out for ``num_shards`` shards, with ``room`` empty slots
    after it (the answer's tokens)."""
    meta = jax.tree.map(lambda x: np.asarray(x[0]), prompt.inputs.meta)
    table = prompt.inputs.regions
    layout = SequenceLayout(
        meta.kind,
        meta.unit,
        meta.region,
        meta.position,
        *region_extents(meta.region, meta.position, table.num_regions),
        region_capacity=table.capacity,
        num_units=int(meta.unit.max()) + 1,
    )
    sharded = shard_with_room(layout, num_shards, room)
    # Every real slot's new slot, matched by its (unique) position id.
    old = np.flatnonzero(meta.position >= 0)
    new = np.flatnonzero(sharded.position >= 0)
    slot_of_position = np.zeros(int(meta.position.max()) + 1, np.int64)
    slot_of_position[sharded.position[new]] = new
    moved = slot_of_position[meta.position[old]]
    free_slot = int(new.max()) + 1
    if (
        free_slot + room > sharded.length
        or (sharded.kind[free_slot : free_slot + room] != TokenKind.PADDING).any()
    ):
        raise AssertionError("shard_layouts left no contiguous room after the prompt")

    def relaid(column, fill: int = -1):
        out = np.full((1, sharded.length), fill, np.int32)
        out[0, moved] = np.asarray(column[0])[old]
        return out

    sharded_meta, sharded_regions = batch_layouts([sharded])
    inputs = MultimodalInputs(
        input_ids=relaid(prompt.inputs.input_ids, 0),
        units=prompt.inputs.units,
        visual_index=relaid(prompt.inputs.visual_index),
        context_index=relaid(prompt.inputs.context_index),
        meta=sharded_meta,
        regions=sharded_regions,
    )
    region_ids = np.full(sharded.num_regions, -1, np.int32)
    visual = sharded.region[moved] >= 0
    region_ids[sharded.region[moved][visual]] = meta.region[old][visual]
    return ShardedPrompt(
        prompt=dataclasses.replace(
            prompt,
            inputs=inputs,
            last_slot=int(slot_of_position[prompt.next_position - 1]),
            length=sharded.length,
        ),
        free_slot=free_slot,
        region_ids=region_ids,
    )

"""Re-placing samples' layouts for a KV cache sharded along its sequence axis.

:func:`shard_layouts` puts each sample's region-major layout (:func:`regions.build_layout`) into
``P`` blocks of ``L`` slots, one per shard of the mesh axis that splits the sequence, so that it
follows the layout contract of ``kernels.gaze_attention.sharded`` (which
``sharded.check_sharded_layout`` checks): no region straddles a block, and region ids are
shard-major (block ``s`` owns ids ``[s·R, (s+1)·R)``). ``regions.batch_layouts`` then gives the
cache metadata and region table, with ``max_len = P·L``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gazejax.gaze.regions import SequenceLayout, region_extents
from kernels.gaze_attention.metadata import TokenKind


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
    counts = [
        _regions_per_block(layout, sizes, blocks, num_shards)
        for layout, sizes, blocks in zip(layouts, atoms, placed, strict=True)
    ]
    needed = max(max(int(c.max()) for c in counts), 1)
    regions_per_shard = needed if regions_per_shard is None else regions_per_shard
    if regions_per_shard < needed:
        raise ValueError(f"regions_per_shard={regions_per_shard} < {needed} regions on a shard")
    return [
        _relayout(layout, sizes, blocks, num_shards, shard_length, regions_per_shard)
        for layout, sizes, blocks in zip(layouts, atoms, placed, strict=True)
    ]


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
        _, first_slot, index = np.unique(
            layout.region[here], return_index=True, return_inverse=True
        )
        rank = np.argsort(np.argsort(first_slot))  # ids in order of their first slot
        region[here] = block * regions_per_shard + rank[index]

    length = num_shards * shard_length
    columns = []  # kind, unit, region, position
    for values in (layout.kind, layout.unit, region, layout.position):
        column = np.full(length, -1, np.int32)
        column[dest] = values
        columns.append(column)
    return SequenceLayout(
        *columns,
        *region_extents(columns[2], columns[3], num_shards * regions_per_shard),
        region_capacity=layout.region_capacity,
        num_units=layout.num_units,
    )

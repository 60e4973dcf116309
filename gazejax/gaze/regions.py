"""Gaze regions and the sequence layout: which token is where, and what it is.

A sample interleaves text and visual units (images, video frames). Each unit's ``H × W`` grid
is cut into regions of ``r_h × r_w`` tokens (and ``r_t`` consecutive frames for video); edge
regions are smaller where the grid is not divisible. Visual tokens are *stored* region-major (a
region is one contiguous slice of the KV cache) while their *position ids* keep raster order, so
every mask is defined on positions and kinds, never on storage order (DESIGN.md §2).

Storage of one visual segment, per clip of ``r_t`` frames: the clip's visual tokens region-major
(tokens of a region in raster order), then the ``|C|`` context tokens of each of its frames.
Positions follow the raster sequence ``frame 0, context 0, frame 1, context 1, ...``.

Host side (NumPy): :func:`partition_unit`, :func:`build_layout`; :func:`batch_layouts` stacks
samples into the op's device-side pytrees (``kernels.gaze_attention.metadata``:
:class:`TokenMeta`, :class:`RegionTable`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels.gaze_attention.metadata import RegionTable, TokenKind, TokenMeta


class RegionSize(NamedTuple):
    """Region extent ``r_h × r_w × r_t``: ``height × width`` tokens over ``frames`` frames."""

    height: int
    width: int
    frames: int = 1

    @property
    def capacity(self) -> int:
        """``m``: the most tokens one region can hold."""
        return self.height * self.width * self.frames


def validate_region_size(
    region_size: Sequence[int], height: int | None = None, width: int | None = None
) -> RegionSize:
    """``region_size`` as a :class:`RegionSize`, checked (against an ``height × width`` grid).

    Raises ValueError naming ``region_size`` when an extent is < 1 or a spatial extent exceeds
    the grid. A video shorter than ``r_t`` frames is allowed: its last clip is a ragged edge.
    """
    if len(region_size) not in (2, 3):
        raise ValueError(f"region_size must be (r_h, r_w) or (r_h, r_w, r_t), got {region_size}")
    size = RegionSize(*(int(s) for s in region_size))
    if min(size) < 1:
        raise ValueError(f"region_size extents must be >= 1, got {tuple(size)}")
    if height is not None and (size.height > height or size.width > width):
        raise ValueError(
            f"region_size {tuple(size)} is larger than the {height}×{width} token grid"
        )
    return size


def partition_unit(
    frames: int, height: int, width: int, region_size: Sequence[int]
) -> tuple[np.ndarray, int]:
    """Region of every token of a ``frames × height × width`` grid.

    Returns ``(region [frames * height * width] int32, num_regions)``: local region ids in the
    grid's raster order (frame, row, column). Regions are numbered clip by clip, then row-major
    over the region grid; edge regions hold fewer tokens where the grid is not divisible.
    """
    if min(frames, height, width) < 1:
        raise ValueError(f"grid must be non-empty, got {frames}×{height}×{width}")
    size = validate_region_size(region_size, height, width)
    rows, cols = math.ceil(height / size.height), math.ceil(width / size.width)
    clips = math.ceil(frames / size.frames)
    f, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    region = ((f // size.frames) * rows + y // size.height) * cols + x // size.width
    return region.reshape(-1).astype(np.int32), clips * rows * cols


@dataclasses.dataclass(frozen=True)
class TextSegment:
    """``length`` text tokens."""

    length: int


@dataclasses.dataclass(frozen=True)
class VisualSegment:
    """An image (``frames=1``) or a video of ``frames`` frames on a ``height × width`` grid.

    Every frame is a visual unit and is followed by its own context tokens.
    """

    height: int
    width: int
    frames: int = 1


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """One sample's tokens in storage (KV-cache) order. NumPy, host side.

    Attributes:
      kind, unit, region, position: [length] int32 per storage slot; see :class:`TokenMeta`.
        ``position`` is also the region-major permutation: slot ``i`` holds raster token
        ``position[i]`` (``-1`` for padding slots).
      region_start, region_length, region_last_position: [num_regions] int32; see
        :class:`RegionTable`.
      region_capacity: ``m``, the most tokens a region holds.
      num_units: visual units (images or frames).
    """

    kind: np.ndarray
    unit: np.ndarray
    region: np.ndarray
    position: np.ndarray
    region_start: np.ndarray
    region_length: np.ndarray
    region_last_position: np.ndarray
    region_capacity: int
    num_units: int

    @property
    def length(self) -> int:
        return int(self.kind.shape[0])

    @property
    def num_regions(self) -> int:
        return int(self.region_start.shape[0])

    def to_storage(self, raster: np.ndarray) -> np.ndarray:
        """``raster [num_tokens, ...]`` values (raster order) → ``[length, ...]`` storage order.

        Padding slots get zeros.
        """
        raster = np.asarray(raster)
        out = raster[np.maximum(self.position, 0)]
        out[self.position < 0] = 0
        return out


def build_layout(
    segments: Sequence[TextSegment | VisualSegment],
    region_size: Sequence[int],
    num_context_tokens: int,
    pad_regions: bool = False,
) -> SequenceLayout:
    """Storage layout of a sample made of ``segments`` (text and visual, in order).

    Args:
      segments: the sample, in raster order.
      region_size: ``(r_h, r_w)`` or ``(r_h, r_w, r_t)``.
      num_context_tokens: ``|C|`` context tokens after every unit (frame).
      pad_regions: pad every region with padding slots to ``m`` slots, so regions start at
        multiples of ``m`` within their clip (for kernels that want fixed-size tiles).
    """
    if num_context_tokens < 0:
        raise ValueError(f"num_context_tokens must be >= 0, got {num_context_tokens}")
    capacity = validate_region_size(region_size).capacity
    columns: list[tuple[np.ndarray, ...]] = []  # (kind, unit, region, position) per segment
    position, num_units, num_regions = 0, 0, 0
    for segment in segments:
        if isinstance(segment, TextSegment):
            n = segment.length
            columns.append(_column(n, TokenKind.TEXT, -1, -1, position + np.arange(n)))
            position += n
            continue
        frames, height, width = segment.frames, segment.height, segment.width
        size = validate_region_size(region_size, height, width)
        local, count = partition_unit(frames, height, width, size)
        frame_len = height * width + num_context_tokens
        for clip_start in range(0, frames, size.frames):
            clip = range(clip_start, min(clip_start + size.frames, frames))
            tokens = np.concatenate(
                [local[f * height * width : (f + 1) * height * width] for f in clip]
            )
            raster = np.concatenate(
                [position + (f - clip_start) * frame_len + np.arange(height * width) for f in clip]
            )
            order = np.argsort(tokens, kind="stable")
            tokens, raster = tokens[order], raster[order]
            units = num_units + (raster - position) // frame_len
            if pad_regions:
                tokens, raster, units = _pad_regions(tokens, raster, units, capacity)
            kind = np.where(tokens >= 0, TokenKind.VISUAL, TokenKind.PADDING)
            region = np.where(tokens >= 0, tokens + num_regions, -1)
            columns.append((kind, units, region, raster))
            for i, f in enumerate(clip):
                context = position + (f - clip_start) * frame_len + height * width
                columns.append(
                    _column(
                        num_context_tokens,
                        TokenKind.CONTEXT,
                        num_units + i,
                        -1,
                        context + np.arange(num_context_tokens),
                    )
                )
            position += len(clip) * frame_len
            num_units += len(clip)
        num_regions += count
    kind, unit, region, pos = (
        np.concatenate(c).astype(np.int32) for c in zip(*columns, strict=True)
    )
    return SequenceLayout(
        kind,
        unit,
        region,
        pos,
        *region_extents(region, pos, num_regions),
        region_capacity=capacity,
        num_units=num_units,
    )


def _column(n: int, kind: int, unit: int, region: int, position: np.ndarray) -> tuple:
    full = np.zeros(n, np.int32)
    return full + kind, full + unit, full + region, position.astype(np.int32)


def _pad_regions(tokens, raster, units, capacity):
    """Pads each region's run in ``tokens`` (sorted ids) with ``-1`` slots to ``capacity``."""
    ids, first, counts = np.unique(tokens, return_index=True, return_counts=True)
    rank = np.repeat(np.arange(ids.size), counts)
    dest = rank * capacity + np.arange(tokens.size) - first[rank]
    padded = np.full((3, ids.size * capacity), -1, np.int64)
    padded[:, dest] = tokens, raster, units
    return tuple(padded)


def region_extents(
    region: np.ndarray, position: np.ndarray, num_regions: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-region ``(start slot, token count, last position)``, each [num_regions] int32, of a
    storage-ordered sample (``region``, ``position``: [length], ``-1`` off regions)."""
    real = np.flatnonzero(region >= 0)
    ids = region[real]
    length = np.bincount(ids, minlength=num_regions)
    first = np.full(num_regions, np.iinfo(np.int32).max, np.int64)
    np.minimum.at(first, ids, real)
    last = np.full(num_regions, -1, np.int64)
    np.maximum.at(last, ids, position[real])
    start = np.where(length > 0, first, 0)
    return start.astype(np.int32), length.astype(np.int32), last.astype(np.int32)


def batch_layouts(
    layouts: Sequence[SequenceLayout], length: int | None = None, num_regions: int | None = None
) -> tuple[TokenMeta, RegionTable]:
    """Stacks samples into ``(TokenMeta [batch, length], RegionTable [batch, num_regions])``.

    Shorter samples are padded with padding slots and empty (``length == 0``) regions. ``length``
    and ``num_regions`` default to the largest sample's.
    """
    length = length or max(x.length for x in layouts)
    num_regions = num_regions or max(x.num_regions for x in layouts)
    if any(x.length > length or x.num_regions > num_regions for x in layouts):
        raise ValueError(f"a layout exceeds length={length} or num_regions={num_regions}")

    def stack(name: str, size: int, fill: int) -> jax.Array:
        rows = [
            np.pad(getattr(x, name), (0, size - getattr(x, name).shape[0]), constant_values=fill)
            for x in layouts
        ]
        return jnp.asarray(np.stack(rows), jnp.int32)

    meta = TokenMeta(*(stack(n, length, -1) for n in ("kind", "unit", "region", "position")))
    table = RegionTable(
        stack("region_start", num_regions, 0),
        stack("region_length", num_regions, 0),
        stack("region_last_position", num_regions, -1),
        capacity=max(x.region_capacity for x in layouts),
    )
    return meta, table

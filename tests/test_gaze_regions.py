"""Gaze regions and the sequence layout (DESIGN.md §2)."""

import jax
import numpy as np
import pytest

from gazejax.gaze.regions import (
    RegionSize,
    TextSegment,
    VisualSegment,
    batch_layouts,
    build_layout,
    partition_unit,
)
from kernels.gaze_attention import TokenKind, region_table


@pytest.mark.parametrize(
    "frames, height, width, size, expected_regions",
    [
        (1, 6, 6, (3, 3), 4),
        (1, 7, 5, (3, 2), 9),  # ragged in both directions
        (3, 4, 4, (2, 2, 2), 8),  # 2 clips (the second ragged in time) × 4
        (4, 5, 4, (5, 4, 1), 4),  # one region per frame
    ],
)
def test_partition_tiles_the_grid_with_ragged_edges(frames, height, width, size, expected_regions):
    region, count = partition_unit(frames, height, width, size)
    assert count == expected_regions
    size = RegionSize(*size)
    grid = region.reshape(frames, height, width)
    for g in range(count):
        f, y, x = np.nonzero(grid == g)
        assert f.size > 0 and f.size <= size.capacity
        # a region is a box: exactly the product of its extents
        assert f.size == len(set(f)) * len(set(y)) * len(set(x))
        assert len(set(f // size.frames)) == len(set(y // size.height)) == 1
        assert len(set(x // size.width)) == 1
    assert np.bincount(region).sum() == frames * height * width


def test_partition_edge_regions_are_smaller():
    region, count = partition_unit(1, 7, 7, (3, 3))
    sizes = np.bincount(region, minlength=count).reshape(3, 3)
    np.testing.assert_array_equal(sizes, [[9, 9, 3], [9, 9, 3], [3, 3, 1]])


def test_temporal_regions_group_consecutive_frames():
    region, count = partition_unit(3, 2, 2, (2, 2, 2))
    grid = region.reshape(3, 2, 2)
    assert count == 2
    assert (grid[0] == grid[1]).all() and (grid[2] != grid[0]).all()


@pytest.mark.parametrize(
    "size, grid, match",
    [
        ((0, 3), (4, 4), "region_size"),
        ((3, -1, 1), (4, 4), "region_size"),
        ((3, 3, 0), (4, 4), "region_size"),
        ((5, 2), (4, 4), "region_size"),
        ((2, 7), (8, 6), "region_size"),
        ((2,), (4, 4), "region_size"),
    ],
)
def test_invalid_region_size_names_the_key(size, grid, match):
    with pytest.raises(ValueError, match=match):
        partition_unit(1, *grid, size)
    with pytest.raises(ValueError, match=match):
        build_layout([VisualSegment(*grid)], size, 4)


def test_negative_context_tokens_names_the_key():
    with pytest.raises(ValueError, match="num_context_tokens"):
        build_layout([VisualSegment(4, 4)], (2, 2), -1)


SEGMENTS = [
    TextSegment(3),
    VisualSegment(5, 4, frames=3),
    TextSegment(2),
    VisualSegment(3, 3),
    TextSegment(4),
]


def raster_sequence(segments, num_context):
    """(kind, unit, frame-local (f, y, x) or None) per raster-order token."""
    tokens, unit = [], 0
    for s in segments:
        if isinstance(s, TextSegment):
            tokens += [(TokenKind.TEXT, -1, None)] * s.length
            continue
        for f in range(s.frames):
            tokens += [
                (TokenKind.VISUAL, unit, (f, y, x)) for y in range(s.height) for x in range(s.width)
            ]
            tokens += [(TokenKind.CONTEXT, unit, None)] * num_context
            unit += 1
    return tokens


@pytest.mark.parametrize("size", [(2, 3), (2, 2, 2), (3, 3, 3)])
def test_storage_is_a_region_major_permutation_with_raster_positions(size):
    layout = build_layout(SEGMENTS, size, 2)
    raster = raster_sequence(SEGMENTS, 2)
    assert sorted(layout.position) == list(range(len(raster)))
    kinds = np.array([t[0] for t in raster])
    units = np.array([t[1] for t in raster])
    np.testing.assert_array_equal(layout.kind, kinds[layout.position])
    np.testing.assert_array_equal(layout.unit, units[layout.position])
    # text keeps its order; each region is one contiguous run of slots, in raster order inside
    text = layout.position[layout.kind == TokenKind.TEXT]
    assert (np.diff(text) > 0).all()
    visual = layout.kind == TokenKind.VISUAL
    runs = layout.region[visual]
    assert (np.diff(runs) >= 0).all(), "regions are stored one after another"
    for g in range(layout.num_regions):
        slots = np.flatnonzero(layout.region == g)
        assert (np.diff(slots) == 1).all()
        assert (np.diff(layout.position[slots]) > 0).all()
        assert layout.region_start[g] == slots[0]
        assert layout.region_length[g] == slots.size
        assert layout.region_last_position[g] == layout.position[slots].max()
    assert layout.num_units == 4 and layout.region_capacity == RegionSize(*size).capacity


def test_storage_regions_are_the_partition_of_each_unit():
    layout = build_layout([TextSegment(1), VisualSegment(5, 4, frames=3)], (2, 3, 2), 2)
    region, _ = partition_unit(3, 5, 4, (2, 3, 2))
    raster = raster_sequence([TextSegment(1), VisualSegment(5, 4, frames=3)], 2)
    for slot in np.flatnonzero(layout.kind == TokenKind.VISUAL):
        f, y, x = raster[layout.position[slot]][2]
        assert layout.region[slot] == region[(f * 5 + y) * 4 + x]


def test_context_tokens_follow_their_frame():
    layout = build_layout([VisualSegment(2, 2, frames=2)], (2, 2, 2), 3)
    context = layout.kind == TokenKind.CONTEXT
    np.testing.assert_array_equal(layout.position[context], [4, 5, 6, 11, 12, 13])
    np.testing.assert_array_equal(layout.unit[context], [0, 0, 0, 1, 1, 1])
    assert (layout.region[context] == -1).all()


def test_to_storage_permutes_raster_values():
    layout = build_layout(SEGMENTS, (2, 2), 1, pad_regions=True)
    raster = np.arange(int(layout.position.max()) + 1) + 100
    stored = layout.to_storage(raster)
    np.testing.assert_array_equal(
        stored[layout.position >= 0], layout.position[layout.position >= 0] + 100
    )
    assert (stored[layout.position < 0] == 0).all()


def test_padded_regions_start_on_capacity_multiples():
    layout = build_layout([TextSegment(2), VisualSegment(5, 5)], (2, 2), 1, pad_regions=True)
    np.testing.assert_array_equal(layout.region_start, 2 + 4 * np.arange(9))
    np.testing.assert_array_equal(layout.region_length, [4, 4, 2, 4, 4, 2, 2, 2, 1])
    padding = layout.kind == TokenKind.PADDING
    assert padding.sum() == 4 * 9 - 25
    assert (layout.position[padding] == -1).all() and (layout.region[padding] == -1).all()


def test_batch_layouts_pads_tokens_and_regions():
    short = build_layout([TextSegment(2), VisualSegment(2, 2)], (2, 2), 1)
    long = build_layout(SEGMENTS, (2, 2), 1)
    meta, table = batch_layouts([short, long])
    assert meta.kind.shape == (2, long.length) and table.start.shape == (2, long.num_regions)
    assert (meta.kind[0, short.length :] == TokenKind.PADDING).all()
    assert not meta.valid[0, short.length :].any() and meta.valid[1].all()
    assert (table.length[0, short.num_regions :] == 0).all()
    assert table.capacity == 4


@pytest.mark.parametrize("pad_regions", [False, True])
def test_region_table_from_metadata_matches_the_layout(pad_regions):
    layouts = [
        build_layout(SEGMENTS, (2, 3, 2), 2, pad_regions),
        build_layout([VisualSegment(3, 4), TextSegment(5)], (2, 3, 2), 2, pad_regions),
    ]
    meta, table = batch_layouts(layouts)
    computed = jax.jit(region_table, static_argnums=(1, 2))(meta, table.num_regions, 12)
    for name in ("start", "length", "last_position"):
        np.testing.assert_array_equal(getattr(computed, name), getattr(table, name))

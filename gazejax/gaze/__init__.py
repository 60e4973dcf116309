"""Gaze attention's layout (regions, per-token metadata) and routing (descriptors, top-K)."""

from gazejax.gaze.regions import (
    RegionSize,
    RegionTable,
    SequenceLayout,
    TextSegment,
    TokenKind,
    TokenMeta,
    VisualSegment,
    batch_layouts,
    build_layout,
    partition_unit,
    region_table,
)
from gazejax.gaze.routing import (
    Selection,
    gaze_kv_size,
    progressive_top_k,
    region_descriptors,
    select_regions,
)

__all__ = [
    "RegionSize",
    "RegionTable",
    "Selection",
    "SequenceLayout",
    "TextSegment",
    "TokenKind",
    "TokenMeta",
    "VisualSegment",
    "batch_layouts",
    "build_layout",
    "gaze_kv_size",
    "partition_unit",
    "progressive_top_k",
    "region_descriptors",
    "region_table",
    "select_regions",
]

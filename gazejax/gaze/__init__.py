"""Gaze attention's sequences: layouts from segments, sharded layouts, and the K budget.

The op itself and its contract (token metadata, region table, routing, visibility) live in
``kernels.gaze_attention``; this package builds its inputs from a sample's segments.
"""

from gazejax.gaze.budget import gaze_kv_size, progressive_top_k
from gazejax.gaze.regions import (
    RegionSize,
    SequenceLayout,
    TextSegment,
    VisualSegment,
    batch_layouts,
    build_layout,
    partition_unit,
    validate_region_size,
)
from gazejax.gaze.shard_layout import shard_layouts

__all__ = [
    "RegionSize",
    "SequenceLayout",
    "TextSegment",
    "VisualSegment",
    "batch_layouts",
    "build_layout",
    "gaze_kv_size",
    "partition_unit",
    "progressive_top_k",
    "shard_layouts",
    "validate_region_size",
]

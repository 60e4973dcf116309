"""Packing geometry: the few numbers that place a visual unit in the sequence.

The model derives it from its parts (``MultimodalConfig.geometry``); the data pipeline packs
with it and never sees a model type (DESIGN.md §5: data -> gaze).
"""

from __future__ import annotations

import dataclasses
import math

from gazejax.gaze.regions import validate_region_size


@dataclasses.dataclass(frozen=True)
class PackingGeometry:
    """How one visual unit (an image or a video frame) enters the packed sequence.

    Attributes:
      unit_grid: ``(h, w)``: a unit's grid of LLM tokens (after the projector).
      region_size: ``(r_h, r_w)`` or ``(r_h, r_w, r_t)`` in tokens (and frames).
      num_context_tokens: ``|C|`` context tokens after each unit (0: none).
      image_size: side of a unit's square pixels ``[image_size, image_size, 3]``.

    Raises:
      ValueError: naming ``num_context_tokens`` or ``region_size`` (an extent < 1, or a region
        larger than the unit grid).
    """

    unit_grid: tuple[int, int]
    region_size: tuple[int, ...]
    num_context_tokens: int
    image_size: int

    def __post_init__(self):
        if self.num_context_tokens < 0:
            raise ValueError(f"num_context_tokens must be >= 0, got {self.num_context_tokens}")
        validate_region_size(self.region_size, *self.unit_grid)

    @property
    def tokens_per_unit(self) -> int:
        """``h * w``: visual tokens of one unit."""
        h, w = self.unit_grid
        return h * w

    @property
    def slots_per_unit(self) -> int:
        """Sequence slots of one unit: its visual tokens and its context tokens."""
        return self.tokens_per_unit + self.num_context_tokens

    @property
    def region_capacity(self) -> int:
        """``m``: the most tokens one region holds."""
        return math.prod(self.region_size)

"""The unit a benchmark hands to the sweep: one scored sequence (:class:`Example`), and the
packed shape that fits a bucket of them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from gazejax.cost import regions_per_unit
from gazejax.data.packing import Text, Visual
from gazejax.gaze.regions import validate_region_size
from gazejax.models.mllm import MultimodalConfig


@dataclasses.dataclass(frozen=True)
class Example:
    """One scored sequence: a question, or a conversation of several (each answer scored with
    the earlier turns, their reference answers, in context). A multiple-choice question is one
    Example per option (``group``: the question's index in its benchmark, ``option``: the
    option's; -1 when not a choice).

    Attributes:
      items: the packed conversation (text spans and visuals), every answer supervised.
      task, family: the breakdowns of the results (``by_task``, ``by_family``) of the first
        answer.
      bucket: examples of one bucket are packed to one shape (one compilation per method).
      later_turns: ``(task, family)`` of the second and later answers, in order.
    """

    items: list
    task: str
    family: str
    bucket: str
    group: int = -1
    option: int = -1
    later_turns: tuple[tuple[str, str], ...] = ()

    @property
    def turns(self) -> tuple[tuple[str, str], ...]:
        """``(task, family)`` of every answer, in order."""
        return ((self.task, self.family), *self.later_turns)


def batch_shape(config: MultimodalConfig, examples: Sequence[Example]) -> tuple[int, int, int]:
    """``(length, max_units, num_regions)`` that fit every example (length rounded up to 8)."""
    h, w = config.unit_grid
    length = units = regions = 1
    for example in examples:
        text = sum(len(x.ids) for x in example.items if isinstance(x, Text))
        frames = [len(x.frames) for x in example.items if isinstance(x, Visual)]
        size = validate_region_size(config.region_size, h, w)
        n = sum(frames)
        length = max(length, text + n * (h * w + config.num_context_tokens))
        units = max(units, n)
        regions = max(regions, sum(regions_per_unit((h, w), f, size) for f in frames))
    return math.ceil(length / 8) * 8, units, regions

"""Host-side packing of interleaved text and visual units into static-shape model inputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gazejax.gaze.geometry import PackingGeometry
from gazejax.gaze.inputs import MultimodalInputs
from gazejax.gaze.regions import TextSegment, VisualSegment, batch_layouts, build_layout


class PackingError(ValueError):
    """A sample that does not fit the batch shape: ``field`` (``length``, ``max_units`` or
    ``num_regions``) is ``given`` but the sample needs ``needed``."""

    def __init__(self, sample: int, field: str, needed: int, given: int):
        super().__init__(f"sample {sample} needs {field} >= {needed}, got {field}={given}")
        self.field, self.needed, self.given = field, needed, given


@dataclasses.dataclass(frozen=True)
class Text:
    """Token ids ``[n]`` of a text span and, for training, each token's target ``[n]``: the id
    the model should predict after it, or -1 (no loss)."""

    ids: np.ndarray
    targets: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Visual:
    """An image (``frames [1, H, W, 3]``) or a video (``[T, H, W, 3]``); each frame is a unit."""

    frames: np.ndarray


def pack_batch(
    samples: Sequence[Sequence[Text | Visual]],
    geometry: PackingGeometry,
    length: int,
    max_units: int,
    num_regions: int,
    pad_id: int = 0,
) -> tuple[MultimodalInputs, jax.Array]:
    """Packs samples (each a list of text spans and visual items, in order) into one batch.

    Every sample is laid out region-major by ``geometry`` (the model's unit grid, region size
    and context tokens; :func:`gazejax.gaze.regions.build_layout`), then padded to ``length``
    slots, ``max_units`` units and ``num_regions`` regions.

    Returns:
      The model inputs and the targets, int32 ``[batch, length]`` in storage order (-1: no loss).

    Raises:
      PackingError: a sample needs more slots, units or regions than given.
    """
    h, w = geometry.unit_grid
    per_unit = geometry.tokens_per_unit
    num_context = geometry.num_context_tokens
    image_shape = None
    rows = []
    for index, sample in enumerate(samples):
        segments, ids, visual_index, context_index, targets, units = [], [], [], [], [], []
        for item in sample:
            if isinstance(item, Text):
                segments.append(TextSegment(len(item.ids)))
                ids.append(np.asarray(item.ids, np.int32))
                visual_index.append(np.full(len(item.ids), -1))
                context_index.append(np.full(len(item.ids), -1))
                none = np.full(len(item.ids), -1)
                targets.append(none if item.targets is None else np.asarray(item.targets))
                continue
            segments.append(VisualSegment(h, w, frames=len(item.frames)))
            for frame in item.frames:
                image_shape = frame.shape
                unit = len(units)
                units.append(frame)
                n = geometry.slots_per_unit
                ids.append(np.full(n, pad_id, np.int32))
                targets.append(np.full(n, -1))
                visual_index.append(
                    np.concatenate(
                        [
                            unit * per_unit + np.arange(per_unit),
                            np.full(num_context, -1),
                        ]
                    )
                )
                context_index.append(
                    np.concatenate([np.full(per_unit, -1), np.arange(num_context)])
                )
        if len(units) > max_units:
            raise PackingError(index, "max_units", len(units), max_units)
        layout = build_layout(segments, geometry.region_size, num_context)
        if layout.length > length:
            raise PackingError(index, "length", layout.length, length)
        if layout.num_regions > num_regions:
            raise PackingError(index, "num_regions", layout.num_regions, num_regions)
        columns = [
            layout.to_storage(np.concatenate(c))
            for c in (ids, visual_index, context_index, targets)
        ]
        fills = (pad_id, -1, -1, -1)
        for column, fill in zip(columns, fills, strict=True):
            column[layout.position < 0] = fill  # padding slots inside the layout, if any
        pad = length - layout.length
        columns = [
            np.pad(c, (0, pad), constant_values=fill)
            for c, fill in zip(columns, fills, strict=True)
        ]
        rows.append((layout, columns, units))
    if image_shape is None:
        image_shape = (geometry.image_size, geometry.image_size, 3)
    meta, regions = batch_layouts([r[0] for r in rows], length, num_regions)
    pixels = np.zeros((len(rows), max_units, *image_shape), np.float32)
    for b, (_, _, units) in enumerate(rows):
        if units:
            pixels[b, : len(units)] = np.stack(units)
    input_ids, visual_index, context_index, targets = (
        jnp.asarray(np.stack([r[1][i] for r in rows]), jnp.int32) for i in range(4)
    )
    inputs = MultimodalInputs(
        input_ids, jnp.asarray(pixels), visual_index, context_index, meta, regions
    )
    return inputs, targets


def interleave(
    ids: np.ndarray,
    placeholder_id: int,
    visuals: Sequence[Visual],
    targets: np.ndarray | None = None,
) -> list[Text | Visual]:
    """Splits token ids at each ``placeholder_id`` (``<image>``) and puts the visuals there.

    Args:
      ids: int ``[n]`` token ids of a conversation with one placeholder per visual item.
      placeholder_id: the placeholder's token id (the placeholder itself is dropped).
      visuals: the images / videos, in order.
      targets: optional int ``[n]`` next-token targets, split along with ``ids``.

    Raises:
      ValueError: the number of placeholders differs from the number of visuals.
    """
    ids = np.asarray(ids)
    cuts = np.flatnonzero(ids == placeholder_id)
    if len(cuts) != len(visuals):
        raise ValueError(f"{len(cuts)} placeholder token(s) for {len(visuals)} image(s)/video(s)")
    bounds = [-1, *cuts.tolist(), len(ids)]
    items: list[Text | Visual] = []
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if stop > start + 1:
            span = slice(start + 1, stop)
            items.append(Text(ids[span], None if targets is None else np.asarray(targets)[span]))
        if i < len(visuals):
            items.append(visuals[i])
    return items

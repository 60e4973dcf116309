"""Packing interleaved text and visual units into region-major, static-shape batches."""

from __future__ import annotations

import numpy as np
import pytest

from gazejax.data.batches import Batches, BatchShape, Bucket
from gazejax.data.packing import Text, Visual, interleave, pack_batch
from gazejax.gaze.geometry import PackingGeometry
from kernels.gaze_attention import TokenKind
from tests.test_mllm import _config

IMAGE = 7  # placeholder id


def _frames(n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 16, 16, 3)).astype(np.float32)


def test_interleave_puts_visuals_at_placeholders():
    ids = np.array([5, IMAGE, 6, 8, IMAGE, IMAGE, 9])
    a, b, c = Visual(_frames(1)), Visual(_frames(2)), Visual(_frames(1))
    items = interleave(ids, IMAGE, [a, b, c])
    assert [type(x).__name__ for x in items] == [
        "Text",
        "Visual",
        "Text",
        "Visual",
        "Visual",
        "Text",
    ]
    assert items[1] is a and items[3] is b and items[4] is c
    np.testing.assert_array_equal(items[2].ids, [6, 8])


@pytest.mark.parametrize("count", [1, 3])
def test_interleave_rejects_a_placeholder_count_mismatch(count):
    with pytest.raises(ValueError, match="2 placeholder"):
        interleave(np.array([IMAGE, 3, IMAGE]), IMAGE, [Visual(_frames(1))] * count)


def test_packed_sample_keeps_raster_positions_and_text():
    config = _config(region_size=(3, 3, 1))
    text = [np.array([11, 12]), np.array([13, 14, 15])]
    sample = [Text(text[0]), Visual(_frames(2)), Text(text[1], targets=np.array([14, 15, 3]))]
    inputs, targets = pack_batch([sample], config.geometry, length=48, max_units=2, num_regions=8)
    kind = np.asarray(inputs.meta.kind)[0]
    position = np.asarray(inputs.meta.position)[0]
    n = 2 + 2 * (16 + 2) + 3
    np.testing.assert_array_equal(np.sort(position[kind >= 0]), np.arange(n))
    assert (kind[n:] == TokenKind.PADDING).all()
    text_slots = kind == TokenKind.TEXT
    order = np.argsort(position[text_slots])
    np.testing.assert_array_equal(
        np.asarray(inputs.input_ids)[0][text_slots][order], np.concatenate(text)
    )
    np.testing.assert_array_equal(np.asarray(targets)[0][text_slots][order], [-1, -1, 14, 15, 3])
    assert (np.asarray(targets)[0][~text_slots] == -1).all()
    visual = np.asarray(inputs.visual_index)[0]
    assert sorted(visual[kind == TokenKind.VISUAL]) == list(range(32))
    region = np.asarray(inputs.meta.region)[0]
    for g in np.unique(region[region >= 0]):  # region-major: each region is contiguous
        slots = np.flatnonzero(region == g)
        assert slots.max() - slots.min() + 1 == len(slots)


def test_pack_batch_names_what_does_not_fit():
    config = _config()
    sample = [Text(np.arange(1, 6)), Visual(_frames(3))]
    with pytest.raises(ValueError, match="max_units=2"):
        pack_batch([sample], config.geometry, length=128, max_units=2, num_regions=16)
    with pytest.raises(ValueError, match="length=20"):
        pack_batch([sample], config.geometry, length=20, max_units=3, num_regions=16)


def test_a_bucket_too_small_names_its_config_key_and_the_value_needed():
    """region_size (1, 1, 1) on the default's 6x6 images: 36 regions, the bucket holds 9."""
    geometry = PackingGeometry(
        unit_grid=(6, 6), region_size=(1, 1, 1), num_context_tokens=4, image_size=96
    )
    sample = [Text(np.arange(1, 6)), Visual(np.zeros((1, 96, 96, 3), np.float32))]
    bucket = Bucket("image", lambda index: (sample, {}), BatchShape(80, 1, 9))
    with pytest.raises(ValueError) as error:
        Batches([bucket], 2, geometry)(0)
    assert str(error.value) == (
        "config.data.buckets.image.num_regions=9 is too small: a sample of step 0 needs 36 "
        "(unit grid (6, 6), region_size (1, 1, 1))"
    )

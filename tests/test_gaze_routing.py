"""Visual routing: descriptors, scores, exact top-K, progressive K and KV accounting (eq. 2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gazejax.gaze import budget
from gazejax.gaze.regions import TextSegment, VisualSegment, batch_layouts, build_layout
from kernels.gaze_attention import TokenKind, TokenMeta, routing


def random(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def test_descriptors_are_region_means_of_real_tokens():
    layout = build_layout(
        [TextSegment(2), VisualSegment(5, 5), TextSegment(1)], (2, 2), 1, pad_regions=True
    )
    meta, table = batch_layouts([layout], num_regions=10)  # one unused region slot
    key = random(np.random.default_rng(0), 1, layout.length, 2, 3)
    descriptors = routing.region_descriptors(key, meta, 10)
    assert descriptors.shape == (1, 10, 2, 3) and descriptors.dtype == jnp.float32
    for g in range(9):
        expected = np.asarray(key)[0, layout.region == g].mean(axis=0)
        np.testing.assert_allclose(descriptors[0, g], expected, rtol=1e-6)
    assert (descriptors[0, 9] == 0).all()


def test_descriptors_pass_no_gradient():
    meta, _ = batch_layouts([build_layout([VisualSegment(3, 3)], (2, 2), 0)])
    key = random(np.random.default_rng(1), 1, 9, 1, 4)
    grad = jax.grad(lambda k: routing.region_descriptors(k, meta, 4).sum())(key)
    assert (grad == 0).all()


def meta_of(kind, position):
    kind, position = jnp.asarray([kind]), jnp.asarray([position])
    return TokenMeta(
        kind=kind, unit=jnp.full_like(kind, -1), region=jnp.full_like(kind, -1), position=position
    )


def test_only_text_queries_route_and_only_to_earlier_regions():
    layout = build_layout([VisualSegment(2, 4), TextSegment(1), VisualSegment(2, 2)], (2, 2), 1)
    _, table = batch_layouts([layout])
    np.testing.assert_array_equal(table.last_position[0], [5, 7, 13])
    query = meta_of(
        [TokenKind.TEXT, TokenKind.TEXT, TokenKind.TEXT, TokenKind.VISUAL, TokenKind.PADDING],
        [9, 13, 15, 20, 20],
    )
    allowed = routing.routable(query, table)
    np.testing.assert_array_equal(
        allowed[0], [[1, 1, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0]]
    )


def test_ties_go_to_the_lowest_region_and_short_supply_is_marked_invalid():
    descriptors = jnp.asarray([[1.0], [2.0], [2.0], [0.5], [2.0]])[None, :, None, :]
    query = jnp.ones((1, 1, 1, 1))
    allowed = jnp.asarray([[[True, True, True, True, False]]])
    selection = routing.select_regions(query, descriptors, allowed, top_k=2, routing="per_head")
    np.testing.assert_array_equal(selection.region[0, 0, 0], [1, 2])
    selection = routing.select_regions(query, descriptors, allowed, top_k=7, routing="per_head")
    np.testing.assert_array_equal(selection.region[0, 0, 0], [1, 2, 0, 3, -1, -1, -1])
    np.testing.assert_array_equal(selection.valid[0, 0, 0], [1, 1, 1, 1, 0, 0, 0])


def test_shared_routing_sums_the_group_scores():
    rng = np.random.default_rng(2)
    query, descriptors = random(rng, 2, 3, 4, 8), random(rng, 2, 6, 2, 8)
    allowed = jnp.ones((2, 3, 6), bool)
    shared = routing.select_regions(query, descriptors, allowed, top_k=3, routing="shared")
    per_head = routing.select_regions(query, descriptors, allowed, top_k=3, routing="per_head")
    assert shared.region.shape == per_head.region.shape == (2, 3, 4, 3)
    scores = np.einsum(
        "bqhd,brhd->bqhr", np.asarray(query).reshape(2, 3, 2, 2, 8).sum(3), np.asarray(descriptors)
    )
    expected = np.argsort(-scores, axis=-1, kind="stable")[..., :3]
    np.testing.assert_array_equal(shared.region, np.repeat(expected, 2, axis=2))
    assert (shared.region[:, :, 0] == shared.region[:, :, 1]).all()
    assert not (per_head.region[:, :, 0] == per_head.region[:, :, 1]).all()


@pytest.mark.parametrize("bad", [0, -3, 1.5])
def test_invalid_top_k_names_the_key(bad):
    with pytest.raises(ValueError, match="top_k"):
        routing.validate_top_k(bad)
    with pytest.raises(ValueError, match="top_k"):
        budget.gaze_kv_size(bad, 36, 4, 8)


def test_invalid_routing_names_the_key():
    with pytest.raises(ValueError, match="routing"):
        routing.validate_routing("per_group")


def test_progressive_top_k_falls_from_all_regions_to_the_target():
    schedule = [
        budget.progressive_top_k(s, start=128, target=20, decay_steps=1000)
        for s in range(0, 1300, 50)
    ]
    assert schedule[0] == 128 and schedule[-1] == 20
    assert budget.progressive_top_k(500, start=128, target=20, decay_steps=1000) == 74
    assert all(a >= b for a, b in zip(schedule, schedule[1:], strict=False))
    assert budget.progressive_top_k(0, start=128, target=20, decay_steps=0) == 20
    with pytest.raises(ValueError, match="top_k"):
        budget.progressive_top_k(0, start=10, target=20, decay_steps=5)


def test_kv_size_matches_the_paper():
    # §3.5: 8 frames × 576 tokens, m = 36, K = 20, |C| = 4 → 752 of 4608 entries
    assert budget.gaze_kv_size(20, 36, 4, 8) == 752
    assert budget.gaze_kv_size(2, 36, 4, 1) == 76  # Table 1: "72+4"
    assert budget.gaze_kv_size(50, 36, 4, 1, num_regions=16) == 16 * 36 + 4
    with pytest.raises(ValueError, match="num_context_tokens"):
        budget.gaze_kv_size(2, 36, -1, 1)
    with pytest.raises(ValueError, match="region_size"):
        budget.gaze_kv_size(2, 0, 4, 1)

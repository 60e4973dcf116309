"""The Pallas training kernel (interpret mode on CPU) against the reference, and its lowering."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from gazejax.gaze.regions import TextSegment, VisualSegment, batch_layouts, build_layout
from kernels.gaze_attention import reference, routing, visibility
from kernels.gaze_attention.pallas_train import attend_selected_pallas_train, tile_codes


def make_case(samples, region_size, heads, head_dim, dtype, pad_regions=False, seed=0):
    """Metadata of ``samples`` and random q, k, v (padding slots random too), loss weights."""
    layouts = [build_layout(s, region_size, 2, pad_regions) for s in samples]
    meta, table = batch_layouts(layouts)
    rng = np.random.default_rng(seed)
    batch, length = meta.kind.shape
    num_heads, num_kv_heads = heads
    q, k, v, weights = (
        jnp.asarray(rng.standard_normal((batch, length, h, head_dim)), dtype)
        for h in (num_heads, num_kv_heads, num_kv_heads, num_heads)
    )
    return meta, table, q, k, v, weights


@functools.partial(
    jax.jit,
    static_argnames=(
        "implementation",
        "top_k",
        "route",
        "block_q",
        "block_kv",
        "backend",
        "interpret",
    ),
)
def run(
    q,
    k,
    v,
    weights,
    query_meta,
    kv_meta,
    table,
    descriptors,
    *,
    implementation,
    top_k,
    route,
    block_q=None,
    block_kv=None,
    backend=None,
    interpret=None,
):
    """(out, lse, (dq, dk, dv)) for one implementation, given the dispatcher's selection.

    The gradients are those of ``sum(out * weights) + sum(lse * weights[..., 0])`` (``lse``
    where finite), so both outputs' gradients are checked.
    """
    allowed = routing.routable(query_meta, table)
    selection = routing.select_regions(q, descriptors, allowed, top_k=top_k, routing=route)
    if implementation == "reference":
        attend = reference.attend_selected_reference
    else:
        attend = functools.partial(
            attend_selected_pallas_train,
            block_q=block_q,
            block_kv=block_kv,
            backend=backend,
            interpret=interpret,
        )

    def loss(q, k, v):
        out, lse = attend(
            q, k, v, query_meta, kv_meta, table, selection, routing=route, scale=q.shape[-1] ** -0.5
        )
        lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0) * weights[..., 0]
        return jnp.sum(out.astype(jnp.float32) * weights) + jnp.sum(lse_term), (out, lse)

    (_, (out, lse)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, lse, grads


def assert_close(actual, expected, tol):
    """Max error relative to the larger of 1 and the largest expected magnitude."""
    actual, expected = (np.asarray(x, np.float64) for x in (actual, expected))
    assert np.isfinite(actual).all()
    error = np.abs(actual - expected).max(initial=0.0)
    assert error <= tol * max(1.0, np.abs(expected).max(initial=0.0)), error


# name: (samples, region_size, pad_regions, (heads, kv_heads), head_dim, dtype, top_k, routing,
#        (block_q, block_kv), first query slot, tie descriptors)
CASES = {
    "gqa1 d64 K=1 two images": (
        [
            [
                TextSegment(3),
                VisualSegment(4, 4),
                TextSegment(3),
                VisualSegment(3, 5),
                TextSegment(4),
            ]
        ],
        (2, 2),
        False,
        (2, 2),
        64,
        jnp.float32,
        1,
        "per_head",
        (8, 16),
        0,
        False,
    ),
    "gqa2 d128 K=all shared, padded regions, ragged batch": (
        [
            [TextSegment(2), VisualSegment(5, 5), TextSegment(4)],
            [TextSegment(3), VisualSegment(3, 3), TextSegment(2)],
        ],
        (2, 2),
        True,
        (4, 2),
        128,
        jnp.float32,
        "all",
        "shared",
        (16, 8),
        0,
        False,
    ),
    "gqa4 d128 K>regions bf16 ragged edges": (
        [[TextSegment(2), VisualSegment(5, 7), TextSegment(5)]],
        (3, 3),
        False,
        (4, 1),
        128,
        jnp.bfloat16,
        9,
        "per_head",
        (8, 8),
        0,
        False,
    ),
    "gqa8 d64 K=2 shared ties, video, text-only sample, query suffix": (
        [[TextSegment(2), VisualSegment(3, 4, frames=2), TextSegment(6)], [TextSegment(12)]],
        (2, 2, 1),
        False,
        (8, 1),
        64,
        jnp.float32,
        2,
        "shared",
        (8, 16),
        9,
        True,
    ),
    "gqa2 d64 K=3 bf16 per_head, padded regions": (
        [
            [
                TextSegment(3),
                VisualSegment(4, 6),
                TextSegment(2),
                VisualSegment(2, 2),
                TextSegment(4),
            ]
        ],
        (2, 2),
        True,
        (2, 1),
        64,
        jnp.bfloat16,
        3,
        "per_head",
        (16, 16),
        0,
        True,
    ),
}


def prepare(name):
    (
        samples,
        region_size,
        pad_regions,
        heads,
        head_dim,
        dtype,
        top_k,
        route,
        blocks,
        first,
        ties,
    ) = CASES[name]
    meta, table, q, k, v, weights = make_case(
        samples, region_size, heads, head_dim, dtype, pad_regions, seed=len(name)
    )
    descriptors = routing.region_descriptors(k, meta, table.num_regions)
    if ties:  # regions 2 and 3 score exactly like region 1
        descriptors = descriptors.at[:, 2:4].set(descriptors[:, 1:2])
    query_meta = jax.tree.map(lambda x: x[:, first:], meta)
    top_k = table.num_regions if top_k == "all" else top_k
    args = (q[:, first:], k, v, weights[:, first:], query_meta, meta, table, descriptors)
    options = dict(top_k=top_k, route=route)
    return args, options, dict(block_q=blocks[0], block_kv=blocks[1])


def check_against_the_reference(name, **kernel_options):
    args, options, blocks = prepare(name)
    q = args[0]
    tol = 1e-5 if q.dtype == jnp.float32 else 1e-2
    expected, expected_lse, expected_grads = run(*args, implementation="reference", **options)
    out, lse, grads = run(*args, implementation="pallas", **options, **blocks, **kernel_options)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, expected.astype(q.dtype), tol)
    unseen = np.isneginf(np.asarray(expected_lse))
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), unseen)
    assert not unseen.all()  # padding queries (ragged batches) see nothing
    assert_close(np.where(unseen, 0, lse), np.where(unseen, 0, expected_lse), tol)
    for grad, expected_grad, x in zip(grads, expected_grads, args[:3], strict=True):
        assert grad.dtype == x.dtype
        assert_close(grad, expected_grad, tol)
    padding = ~np.asarray(args[4].valid)
    assert (np.asarray(out)[padding] == 0).all() and (np.asarray(grads[0])[padding] == 0).all()
    kv_padding = ~np.asarray(args[5].valid)
    for grad in grads[1:]:
        assert (np.asarray(grad)[kv_padding] == 0).all()


@pytest.mark.parametrize("name", CASES)
def test_forward_and_gradients_equal_the_reference(name):
    """The loop driver (Triton's), interpreted."""
    check_against_the_reference(name)


@pytest.mark.parametrize(
    "name",
    [
        "gqa2 d128 K=all shared, padded regions, ragged batch",
        "gqa4 d128 K>regions bf16 ragged edges",
    ],
)
def test_tpu_grid_driver_equals_the_reference(name):
    """The grid driver (Mosaic's: plan steps on a grid axis with plan-driven index maps,
    accumulators in VMEM scratch), interpreted: batch 2 with padding rows, GQA 4."""
    check_against_the_reference(name, backend="tpu")


def test_tpu_grid_driver_in_the_tpu_interpreter():
    """The same in the TPU interpreter (slow: ~100 grid steps here), which fills scratch and
    unwritten memory with NaN and raises on out-of-bounds reads."""
    params = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")
    check_against_the_reference("gqa1 d64 K=1 two images", backend="tpu", interpret=params)


@pytest.mark.parametrize("backend", [None, "tpu"])
def test_skipped_tiles_are_never_read(backend):
    """NaN in the slots of all-padding tiles cannot reach anything: those tiles are skipped.

    (Without skipping, a masked probability of 0 times a NaN value is still NaN.) With the TPU
    grid driver, steps past a plan's count may hold such a tile in VMEM but compute nothing.
    """
    name = "gqa2 d128 K=all shared, padded regions, ragged batch"
    args, options, blocks = prepare(name)
    valid = np.asarray(args[4].valid)
    batch, length = valid.shape

    def dead_slots(block):  # [b, length, 1, 1]: slots whose whole tile is padding
        tiles = np.pad(valid, [(0, 0), (0, -length % block)]).reshape(batch, -1, block)
        return ~np.repeat(tiles.any(axis=-1), block, axis=1)[:, :length, None, None]

    dead = [dead_slots(blocks["block_q"])] + [dead_slots(blocks["block_kv"])] * 2
    assert all(d.any() for d in dead)
    poisoned = tuple(jnp.where(d, jnp.nan, x) for d, x in zip(dead, args[:3], strict=True))
    clean = run(*args, implementation="pallas", backend=backend, **options, **blocks)
    dirty = run(*poisoned, *args[3:], implementation="pallas", backend=backend, **options, **blocks)
    np.testing.assert_array_equal(dirty[0], clean[0])
    for a, b in zip(dirty[2], clean[2], strict=True):
        np.testing.assert_array_equal(a, b)


def test_tile_codes_skip_exactly_the_invisible_tiles():
    samples = [[TextSegment(4), VisualSegment(8, 8), TextSegment(20)]]
    meta, table, q, k, _, _ = make_case(samples, (2, 2), (2, 1), 8, jnp.float32)
    block = 8

    @jax.jit
    def codes_and_visibility(q, k, meta, table):
        descriptors = routing.region_descriptors(k, meta, table.num_regions)
        allowed = routing.routable(meta, table)
        selection = routing.select_regions(q, descriptors, allowed, top_k=1, routing="per_head")
        codes = tile_codes(meta, meta, selection.region, table.num_regions, block, block)
        chosen = reference.selected_tokens(selection, meta.region, table.num_regions)
        return codes, visibility(meta, meta, chosen)

    codes, visible = (np.asarray(x) for x in codes_and_visibility(q, k, meta, table))
    batch, length, heads, _ = visible.shape
    tiles = -(-length // block)
    padded = np.zeros((batch, tiles * block, heads, tiles * block), bool)
    padded[:, :length, :, :length] = visible
    per_tile = padded.reshape(batch, tiles, block, heads, tiles, block).any(axis=(2, 5))
    per_tile = per_tile.transpose(0, 2, 1, 3)  # visible [b, q, h, kv] → [b, h, q/kv tiles]
    assert codes.shape == per_tile.shape
    assert not (per_tile & (codes == 0)).any()  # never skips a visible pair
    # Exact here (one unit: the context rule's unit ranges are exact too), and many tiles skip.
    np.testing.assert_array_equal(codes != 0, per_tile)
    assert (codes != 0).sum() < 0.6 * codes.size
    # Membership tests only where a selected region has keys: few of the computed tiles.
    assert 0 < (codes & 2).astype(bool).sum() < 0.25 * (codes != 0).sum()


def test_block_sizes_must_be_powers_of_two():
    args, options, _ = prepare("gqa1 d64 K=1 two images")
    q, k, v, _, query_meta, kv_meta, table, descriptors = args
    allowed = routing.routable(query_meta, table)
    selection = routing.select_regions(q, descriptors, allowed, top_k=1, routing="per_head")
    with pytest.raises(ValueError, match="block_q"):
        attend_selected_pallas_train(
            q,
            k,
            v,
            query_meta,
            kv_meta,
            table,
            selection,
            routing="per_head",
            scale=0.1,
            block_q=12,
        )

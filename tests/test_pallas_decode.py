"""The Pallas gaze decode kernel (TPU and Triton variants, interpreted on CPU) against the
reference and xla implementations, its flash-decoding splits and its segment lists. Compiling
them for real devices: ``tests/aot/compile_kernels.py`` (``make compile-kernels``)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gazejax.gaze.regions import TextSegment, VisualSegment, batch_layouts, build_layout
from kernels.gaze_attention import (
    TokenKind,
    gaze_attention,
    pallas_decode,
    reference,
    routing,
    visibility,
)

T, V = TextSegment, VisualSegment
BACKENDS = ["tpu", "triton"]  # the Mosaic and the Triton kernel


def select_and_attend(
    q,
    k,
    v,
    query_meta,
    meta,
    table,
    descriptors,
    *,
    top_k,
    scale,
    backend,
    interpret=None,
    max_unrouted_tokens=None,
    **options,
):
    """The dispatcher's selection, then the decode kernel of an explicit ``backend``."""
    allowed = routing.routable(query_meta, table)
    selection = routing.select_regions(q, descriptors, allowed, top_k=top_k, **options)
    out, _ = pallas_decode.attend_selected_pallas_decode(
        q,
        k,
        v,
        query_meta,
        meta,
        table,
        selection,
        scale=scale,
        max_unrouted_tokens=max_unrouted_tokens,
        backend=backend,
        interpret=interpret,
        **options,
    )
    return out.astype(q.dtype), selection


decode = jax.jit(
    select_and_attend,
    static_argnames=("top_k", "routing", "scale", "max_unrouted_tokens", "backend", "interpret"),
)
attend = jax.jit(
    pallas_decode.attend_selected_pallas_decode,
    static_argnames=("routing", "scale", "max_unrouted_tokens", "splits", "backend", "interpret"),
)


@functools.partial(jax.jit, static_argnames=("top_k", "routing", "max_unrouted_tokens"))
def expectations(q, k, v, query_meta, meta, table, descriptors, *, max_unrouted_tokens, **options):
    """Reference and xla outputs, the selection, which slots each head sees and the lse.

    ``seen`` [batch, 1, heads, kv_len] is the reference mask; ``lse`` [batch, 1, heads] the
    log-sum-exp of the seen logits.
    """
    args = (q, k, v, query_meta, meta, table)
    expected, selection = gaze_attention(
        *args, descriptors=descriptors, return_selection=True, **options
    )
    by_xla = gaze_attention(
        *args,
        descriptors=descriptors,
        implementation="xla",
        max_unrouted_tokens=max_unrouted_tokens,
        **options,
    )
    selected = reference.selected_tokens(selection, meta.region, table.num_regions)
    seen = visibility(query_meta, meta, selected)
    group = q.shape[2] // k.shape[2]
    keys = jnp.repeat(k.astype(jnp.float32), group, axis=2)
    logits = jnp.einsum("bqhd,blhd->bqhl", q.astype(jnp.float32), keys) * q.shape[-1] ** -0.5
    lse = jax.nn.logsumexp(jnp.where(seen, logits, -jnp.inf), axis=-1)
    return expected, by_xla, selection, seen, lse


class Step:
    """One decode step per sample: the query of slot ``slots[i]`` of sample ``i``.

    Keys, values and queries are random per slot; ``descriptors`` are the clean keys' means.
    """

    def __init__(
        self,
        samples,
        region_size,
        slots,
        heads,
        kv_heads,
        head_dim,
        num_context=2,
        pad_regions=False,
        seed=0,
    ):
        layouts = [build_layout(s, region_size, num_context, pad_regions) for s in samples]
        self.meta, self.table = batch_layouts(layouts)
        batch, length = self.meta.kind.shape
        rng = np.random.default_rng(seed)
        q, self.k, self.v = (
            rng.standard_normal((batch, length, h, head_dim)).astype(np.float32)
            for h in (heads, kv_heads, kv_heads)
        )
        rows = np.arange(batch)[:, None], np.asarray(slots)[:, None]
        self.query_meta = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[rows]), self.meta)
        self.q = q[rows]
        self.scale = head_dim**-0.5

    def slot(self, sample, kind, which=-1):
        return np.flatnonzero(np.asarray(self.meta.kind[sample]) == kind)[which]

    def tie(self, sample, source, target):
        """Copies region ``source``'s keys onto region ``target`` (equal descriptors)."""
        region = np.asarray(self.meta.region[sample])
        src, dst = (np.flatnonzero(region == g) for g in (source, target))
        self.k[sample, dst] = self.k[sample, src]

    def cast(self, dtype):
        self.q, self.k, self.v = (jnp.asarray(x, dtype) for x in (self.q, self.k, self.v))
        return self

    @property
    def args(self):
        return self.q, self.k, self.v, self.query_meta, self.meta, self.table

    def descriptors(self):
        return routing.region_descriptors(jnp.asarray(self.k), self.meta, self.table.num_regions)

    def expectations(self, **options):
        return expectations(*self.args, self.descriptors(), **options)


# Each case: layout, per-sample query slots, (heads, kv_heads, head_dim), routing, K,
# max_unrouted_tokens.
IMAGE_TEXT_PADDING = (
    [
        [T(2), V(5, 7), T(3)],  # ragged edge regions (5×7 grid, 3×3 regions)
        [T(6)],  # text only: no region at all
        [T(1), V(3, 3), T(2), V(3, 3), T(2)],  # queried between the images
        [T(2), V(3, 3), T(1)],  # queried at a padding slot: sees nothing
    ],
    (3, 3),
)


def image_text_padding():
    step = Step(*IMAGE_TEXT_PADDING, slots=[0] * 4, heads=2, kv_heads=2, head_dim=64)
    slots = [
        step.slot(0, TokenKind.TEXT),
        step.slot(1, TokenKind.TEXT, 3),
        step.slot(2, TokenKind.TEXT, 2),
        step.slot(3, TokenKind.PADDING, 0),
    ]
    return Step(*IMAGE_TEXT_PADDING, slots=slots, heads=2, kv_heads=2, head_dim=64, seed=1)


def padded_regions_video():
    samples = [[T(2), V(5, 5), T(3)], [T(3), V(4, 4, frames=2), T(2)]]
    step = Step(samples, (2, 2), [0, 0], 4, 2, 128, pad_regions=True)
    slots = [step.slot(0, TokenKind.TEXT), step.slot(1, TokenKind.TEXT)]
    return Step(samples, (2, 2), slots, 4, 2, 128, pad_regions=True, seed=2)


def tied_video():
    samples = [[T(2), V(4, 4, frames=3), T(3)], [T(1), V(3, 5), T(4)]]
    step = Step(samples, (2, 2, 2), [0, 0], 8, 2, 64)
    slots = [step.slot(0, TokenKind.TEXT), step.slot(1, TokenKind.TEXT, -2)]
    step = Step(samples, (2, 2, 2), slots, 8, 2, 64, seed=3)
    step.tie(0, 1, 3)
    step.tie(0, 4, 6)
    return step


def every_query_kind():
    samples = [[T(2), V(4, 4), T(3)], [T(3), V(2, 6), T(2)], [T(1), V(4, 4), T(2)]]
    step = Step(samples, (2, 2), [0] * 3, 8, 1, 128)
    slots = [
        step.slot(0, TokenKind.VISUAL, 7),
        step.slot(1, TokenKind.CONTEXT, 0),
        step.slot(2, TokenKind.TEXT),
    ]
    return Step(samples, (2, 2), slots, 8, 1, 128, seed=4)


def small_cache():
    """A cache shorter than one tile (16 rows): it is padded."""
    samples = [[T(2), V(3, 3), T(1)], [T(1), V(2, 2), T(3)]]
    step = Step(samples, (2, 2), [0, 0], 4, 2, 128)
    slots = [step.slot(0, TokenKind.TEXT), step.slot(1, TokenKind.TEXT)]
    return Step(samples, (2, 2), slots, 4, 2, 128, seed=5)


CASES = {
    "gqa1 d64 per_head K=1 ragged, text-only, padding": (image_text_padding, "per_head", 1, 24),
    "gqa2 d128 shared K=all padded regions": (padded_regions_video, "shared", 9, 32),
    "gqa4 d64 per_head K>regions tied video": (tied_video, "per_head", 40, 32),
    "gqa8 d128 per_head K=3 visual/context/text queries": (every_query_kind, "per_head", 3, None),
}


@pytest.mark.parametrize("name", CASES)
def test_decode_equals_reference_and_xla(name):
    make, route, top_k, bound = CASES[name]
    step = make()
    expected, by_xla, selection, seen, lse = step.expectations(
        top_k=top_k, routing=route, max_unrouted_tokens=bound
    )
    np.testing.assert_allclose(by_xla, expected, rtol=1e-5, atol=1e-5)
    blind = ~np.asarray(seen).any(-1)  # query heads that see nothing: lse -inf, output 0
    assert blind.any() == ("padding" in name)
    q, k, v, *metadata = step.args
    if bound is not None:  # nothing the query does not see may matter, not even NaN
        unseen = ~np.asarray(seen).any(axis=(1, 2))[..., None, None]
        k, v = (np.where(unseen, np.nan, x) for x in (k, v))
    for backend in BACKENDS:
        out, got = attend(
            q,
            k,
            v,
            *metadata,
            selection,
            routing=route,
            scale=step.scale,
            max_unrouted_tokens=bound,
            backend=backend,
        )
        assert out.dtype == got.dtype == jnp.float32
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=backend)
        np.testing.assert_allclose(got, lse, rtol=1e-5, atol=1e-5, err_msg=backend)
        assert np.isfinite(out).all() and not np.isnan(got).any()
        np.testing.assert_array_equal(np.isneginf(got), blind)


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_number_of_splits_gives_the_same_decode(backend):
    """Chunks of a segment list merge by log-sum-exp: 1 split, uneven splits and more splits
    than segments (empty chunks) agree with the reference, output and lse."""
    step = tied_video()
    options = dict(routing="per_head", max_unrouted_tokens=32)
    expected, _, selection, _, lse = step.expectations(top_k=3, **options)
    for splits in (1, 3, 64):
        out, got = attend(
            *step.args, selection, scale=step.scale, splits=splits, backend=backend, **options
        )
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=f"{splits}")
        np.testing.assert_allclose(got, lse, rtol=1e-5, atol=1e-5, err_msg=f"{splits}")


def test_bfloat16_decode_matches_the_reference():
    step = small_cache().cast(jnp.bfloat16)
    assert step.meta.kind.shape[1] < 16
    options = dict(top_k=2, routing="per_head")
    expected, _, selection, _, _ = step.expectations(max_unrouted_tokens=8, **options)
    for backend in BACKENDS:
        out, chosen = decode(
            *step.args,
            step.descriptors(),
            scale=step.scale,
            max_unrouted_tokens=8,
            backend=backend,
            **options,
        )
        assert out.dtype == jnp.bfloat16
        np.testing.assert_array_equal(chosen.region, selection.region)
        np.testing.assert_allclose(
            out.astype(np.float32),
            expected.astype(np.float32),
            rtol=1e-2,
            atol=1e-2,
            err_msg=backend,
        )


def test_unrouted_bound_reads_the_first_slots_like_xla():
    step = tied_video()
    options = dict(top_k=2, routing="shared", max_unrouted_tokens=5)
    kind = np.asarray(step.meta.kind)
    assert (np.isin(kind, (TokenKind.TEXT, TokenKind.CONTEXT)).sum(axis=1) > 5).all()
    by_xla = jax.jit(
        gaze_attention,
        static_argnames=("top_k", "routing", "implementation", "max_unrouted_tokens"),
    )(*step.args, descriptors=step.descriptors(), implementation="xla", **options)
    out, _ = decode(*step.args, step.descriptors(), scale=step.scale, backend="triton", **options)
    np.testing.assert_allclose(out, by_xla, rtol=1e-5, atol=1e-5)


def test_a_text_only_batch_has_no_region_slots():
    samples = [[T(5)], [T(3)]]
    step = Step(samples, (2, 2), [4, 2], 2, 1, 64)
    assert step.table.num_regions == 0
    expected, *_ = step.expectations(top_k=2, routing="per_head", max_unrouted_tokens=8)
    for backend in BACKENDS:
        out, _ = decode(
            *step.args,
            step.descriptors(),
            top_k=2,
            routing="per_head",
            scale=step.scale,
            max_unrouted_tokens=8,
            backend=backend,
        )
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=backend)


# ----------------------------------------------------------------------------------------------
# Segment lists: each selected region once per KV head, the unrouted slots in tile pieces.


@pytest.mark.parametrize("route", ["per_head", "shared"])
def test_a_gqa_group_fetches_each_selected_region_once(route):
    batch, heads, kv_heads, top_k, num_regions = 2, 8, 2, 3, 6
    group = heads // kv_heads
    rng = np.random.default_rng(5)
    region = rng.integers(0, num_regions, (batch, 1, heads, top_k))
    valid = rng.random(region.shape) < 0.8
    if route == "shared":
        region, valid = (np.repeat(x[:, :, ::group], group, axis=2) for x in (region, valid))
    table = batch_layouts([build_layout([T(1), V(4, 6), T(1)], (2, 2), 1)] * batch)[1]
    selection = routing.Selection(jnp.asarray(np.where(valid, region, -1)), jnp.asarray(valid))
    segments = jax.jit(pallas_decode._selected_regions, static_argnums=(2, 3))
    count, start, length, bits = map(np.asarray, segments(table, selection, kv_heads, route))
    for b in range(batch):
        for j in range(kv_heads):
            heads_of = {}
            for h in range(j * group, (j + 1) * group):
                for r in region[b, 0, h][valid[b, 0, h]]:
                    heads_of.setdefault(int(r), set()).add(h - j * group)
            ids = sorted(heads_of)
            assert count[b, j] == len(ids)
            np.testing.assert_array_equal(start[b, j, : len(ids)], table.start[b, ids])
            np.testing.assert_array_equal(length[b, j, : len(ids)], table.length[b, ids])
            assert (length[b, j, len(ids) :] == 0).all()
            expected = [sum(1 << h for h in heads_of[r]) for r in ids]
            np.testing.assert_array_equal(bits[b, j, : len(ids)], expected)
            if route == "shared":
                assert set(expected) <= {2**group - 1}


def test_unrouted_pieces_cover_the_visible_text_and_context():
    step = padded_regions_video()
    tile = 4
    pieces = jax.jit(pallas_decode._unrouted_pieces, static_argnums=(2, 3))
    count, start, length = map(np.asarray, pieces(step.query_meta, step.meta, 32, tile))
    no_regions = jnp.zeros(step.meta.kind.shape, bool)[:, None, None]
    seen = np.asarray(visibility(step.query_meta, step.meta, no_regions))[:, 0, 0]
    for b in range(seen.shape[0]):
        covered = np.zeros_like(seen[b])
        for s, n in zip(start[b, : count[b]], length[b, : count[b]], strict=True):
            assert 1 <= n <= tile and not covered[s : s + n].any()
            covered[s : s + n] = True
        np.testing.assert_array_equal(covered, seen[b])
        assert (length[b, count[b] :] == 0).all()


def _cache_transposes(fn, *args) -> int:
    """Transposes of cache-sized arrays in ``fn``'s jaxpr outside the kernel (whose operands
    are what it reads from HBM)."""
    cache_size = args[1].size
    eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
    return sum(
        e.primitive.name == "transpose" and e.invars[0].aval.size >= cache_size for e in eqns
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_head_major_cache_is_read_in_place(backend):
    """The decoder's cache, head-major ``[b, kv_heads, len, d]``: the kernel reads each (sample,
    KV head)'s rows as they lie (nothing transposes the cache before it) and gives the
    length-major call's output and lse; a length-major cache is transposed once."""
    step = tied_video()
    options = dict(routing="per_head", max_unrouted_tokens=32)
    expected, _, selection, _, lse = step.expectations(top_k=3, **options)
    q, k, v, *metadata = step.args
    head_major = (jnp.swapaxes(jnp.asarray(x), 1, 2) for x in (k, v))
    call = functools.partial(
        pallas_decode.attend_selected_pallas_decode,
        scale=step.scale,
        backend=backend,
        **options,
    )
    args = (q, *head_major, *metadata, selection)
    out, got = jax.jit(functools.partial(call, heads_first=True))(*args)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, lse, rtol=1e-5, atol=1e-5)
    assert _cache_transposes(functools.partial(call, heads_first=True), *args) == 0
    assert _cache_transposes(call, q, jnp.asarray(k), jnp.asarray(v), *metadata, selection) == 2

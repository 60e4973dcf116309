"""The gaze attention op (eq. 2–4): every implementation against dense and a naive oracle."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gazejax.gaze.regions import TextSegment, VisualSegment, batch_layouts, build_layout
from kernels.gaze_attention import (
    TokenKind,
    blockwise,
    gaze_attention,
    pallas_train,
    resolve_implementation,
    routing,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8
IMPLEMENTATIONS = ["reference", "xla", "pallas"]

op = jax.jit(
    gaze_attention,
    static_argnames=(
        "top_k",
        "routing",
        "implementation",
        "max_unrouted_tokens",
        "return_selection",
        "heads_first",
    ),
)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Several query blocks even at test sizes."""
    monkeypatch.setattr(blockwise, "QUERY_BLOCK", 16)
    monkeypatch.setattr(blockwise, "KV_BLOCK", 8)
    monkeypatch.setattr(pallas_train, "DEFAULT_BLOCK", 16)


class Case:
    """Random queries, keys and values over a batch of layouts.

    Values are drawn per raster position, so two layouts of the same samples (e.g. with and
    without padded regions) hold the same token at each position. Padding slots are random too.
    """

    def __init__(self, samples, region_size, num_context=2, seed=0, pad_regions=False):
        self.layouts = [build_layout(s, region_size, num_context, pad_regions) for s in samples]
        self.meta, self.table = batch_layouts(self.layouts)
        rng = np.random.default_rng(seed)
        position = np.asarray(self.meta.position)
        heads = (NUM_HEADS, NUM_KV_HEADS, NUM_KV_HEADS)
        raster = [
            rng.standard_normal((position.shape[0], position.max() + 1, h, HEAD_DIM)) for h in heads
        ]
        index, real = np.maximum(position, 0)[..., None, None], (position >= 0)[..., None, None]
        self.q, self.k, self.v = (
            jnp.asarray(
                np.where(
                    real,
                    np.take_along_axis(x, index, axis=1),
                    rng.standard_normal((*position.shape, *x.shape[2:])),
                ),
                jnp.float32,
            )
            for x in raster
        )

    @property
    def num_regions(self):
        return self.table.num_regions

    def __call__(self, implementation="reference", q=None, k=None, v=None, **options):
        return op(
            self.q if q is None else q,
            self.k if k is None else k,
            self.v if v is None else v,
            self.meta,
            self.meta,
            self.table,
            implementation=implementation,
            **options,
        )

    def decode(self, index, implementation="xla", **options):
        """Query slot ``index`` alone against the whole cache."""
        query_meta = jax.tree.map(lambda x: x[:, index : index + 1], self.meta)
        return op(
            self.q[:, index : index + 1],
            self.k,
            self.v,
            query_meta,
            self.meta,
            self.table,
            implementation=implementation,
            **options,
        )

    def slots(self, *kinds, sample=0):
        return np.flatnonzero(np.isin(np.asarray(self.meta.kind[sample]), kinds))


def dense_mask(meta):
    """[batch, 1, q, kv] causal mask, with the context-token rule: gaze with every region."""
    kind, unit, pos = (np.asarray(x) for x in (meta.kind, meta.unit, meta.position))
    q = (slice(None), slice(None), None)
    k = (slice(None), None, slice(None))
    causal = pos[k] <= pos[q]
    context = (unit[k] == unit[q]) & (
        (kind[k] == TokenKind.VISUAL) | ((kind[k] == TokenKind.CONTEXT) & causal)
    )
    mask = np.where(kind[q] == TokenKind.CONTEXT, context, causal)
    return (mask & (kind[q] >= 0) & (kind[k] >= 0))[:, None]


def naive_gaze(case, top_k, route, descriptors=None):
    """Eq. 2–4 by the letter, NumPy float64 loops over batch, queries and heads."""
    q, k, v = (np.asarray(x, np.float64) for x in (case.q, case.k, case.v))
    kind, unit, region, pos = (
        np.asarray(x)
        for x in (case.meta.kind, case.meta.unit, case.meta.region, case.meta.position)
    )
    batch, length, heads, dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros(q.shape)
    chosen = np.full((batch, length, heads, top_k), -1)
    for b in range(batch):
        visual = kind[b] == TokenKind.VISUAL
        regions = sorted(set(region[b][visual]))
        members = {r: visual & (region[b] == r) for r in regions}
        if descriptors is None:
            desc = {r: k[b, members[r]].mean(axis=0) for r in regions}
        else:
            desc = {r: np.asarray(descriptors, np.float64)[b, r] for r in regions}
        last = {r: pos[b][members[r]].max() for r in regions}
        for i in range(length):
            for h in range(heads):
                j = h // group
                if kind[b, i] == TokenKind.TEXT:
                    earlier = [r for r in regions if last[r] < pos[b, i]]
                    scoring = [h] if route == "per_head" else range(j * group, (j + 1) * group)
                    score = {r: sum(q[b, i, s] @ desc[r][j] for s in scoring) for r in earlier}
                    top = sorted(earlier, key=lambda r: (-score[r], r))[:top_k]
                    chosen[b, i, h, : len(top)] = top
                    sees = (
                        ((kind[b] == TokenKind.TEXT) | (kind[b] == TokenKind.CONTEXT))
                        & (pos[b] <= pos[b, i])
                    ) | (visual & np.isin(region[b], top))
                elif kind[b, i] == TokenKind.VISUAL:
                    sees = (kind[b] >= 0) & (pos[b] <= pos[b, i])
                elif kind[b, i] == TokenKind.CONTEXT:
                    sees = (unit[b] == unit[b, i]) & (
                        visual | ((kind[b] == TokenKind.CONTEXT) & (pos[b] <= pos[b, i]))
                    )
                else:
                    continue
                logits = k[b, sees, j] @ q[b, i, h] / np.sqrt(dim)
                weights = np.exp(logits - logits.max())
                out[b, i, h] = weights @ v[b, sees, j] / weights.sum()
    return out, chosen


# ----------------------------------------------------------------------------------------------
# With every region selected, gaze equals dense causal attention.

DENSE_CASES = {
    "one image": ([[TextSegment(3), VisualSegment(6, 6), TextSegment(5)]], (3, 3)),
    "several images": (
        [[TextSegment(2), VisualSegment(4, 4), VisualSegment(3, 5), TextSegment(4)]],
        (2, 2),
    ),
    "video r_t=1": ([[TextSegment(2), VisualSegment(4, 4, frames=3), TextSegment(3)]], (2, 2, 1)),
    "video r_t=2": ([[TextSegment(2), VisualSegment(4, 4, frames=3), TextSegment(3)]], (2, 2, 2)),
    "text before, between, after": (
        [
            [
                TextSegment(3),
                VisualSegment(3, 3),
                TextSegment(2),
                VisualSegment(3, 3),
                TextSegment(3),
            ]
        ],
        (2, 2),
    ),
    "batch with different units": (
        [
            [TextSegment(2), VisualSegment(3, 3), TextSegment(2)],
            [
                TextSegment(1),
                VisualSegment(3, 3),
                TextSegment(1),
                VisualSegment(3, 3),
                TextSegment(2),
                VisualSegment(2, 2),
                TextSegment(2),
            ],
        ],
        (2, 2),
    ),
    "ragged edge regions": ([[TextSegment(1), VisualSegment(5, 7), TextSegment(3)]], (3, 3)),
}


# Interpret-mode Pallas costs seconds per compiled call on CPU: a subset of the cases.
PALLAS_DENSE_CASES = ("video r_t=2", "batch with different units", "ragged edge regions")


@pytest.mark.parametrize(
    "name, implementation",
    [
        (name, implementation)
        for name in DENSE_CASES
        for implementation in IMPLEMENTATIONS
        if implementation != "pallas" or name in PALLAS_DENSE_CASES
    ],
)
def test_with_every_region_selected_gaze_equals_dense(name, implementation):
    samples, region_size = DENSE_CASES[name]
    case = Case(samples, region_size, seed=len(name))
    mask = dense_mask(case.meta)
    dense = jax.nn.dot_product_attention(case.q, case.k, case.v, mask=jnp.asarray(mask))
    valid = np.asarray(case.meta.valid)
    gaze = case(implementation, top_k=case.num_regions)
    np.testing.assert_allclose(np.asarray(gaze)[valid], np.asarray(dense)[valid], atol=1e-5)
    assert (np.asarray(gaze)[~valid] == 0).all()
    last_text = case.slots(TokenKind.TEXT)[-1]
    decode = case.decode(last_text, implementation, top_k=case.num_regions + 3, routing="shared")
    rows = valid[:, last_text]
    np.testing.assert_allclose(decode[rows, 0], dense[rows, last_text], atol=1e-5)


def test_padded_regions_change_nothing():
    samples = [[TextSegment(2), VisualSegment(5, 5), TextSegment(3)]]
    plain, padded = Case(samples, (2, 2)), Case(samples, (2, 2), pad_regions=True)
    assert padded.meta.kind.shape[1] > plain.meta.kind.shape[1]
    by_position = [
        np.argsort(np.where(c.meta.position[0] < 0, 10**6, c.meta.position[0]))[:30]
        for c in (plain, padded)
    ]
    for implementation in IMPLEMENTATIONS:
        a, b = plain(implementation, top_k=2), padded(implementation, top_k=2)
        np.testing.assert_allclose(a[:, by_position[0]], b[:, by_position[1]], atol=1e-6)
    text = padded.slots(TokenKind.TEXT)[-1]
    decode = padded.decode(text, top_k=2, max_unrouted_tokens=8)
    np.testing.assert_allclose(decode[:, 0], padded("reference", top_k=2)[:, text], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# With few regions, every implementation equals the naive eq. 2–4.

ROUTED = Case(
    [
        [
            TextSegment(2),
            VisualSegment(4, 6),
            TextSegment(3),
            VisualSegment(4, 4, frames=2),
            TextSegment(4),
        ],
        [TextSegment(3), VisualSegment(5, 3), TextSegment(5)],  # ragged regions
    ],
    (2, 2, 1),
    seed=7,
)


def tied(case):
    """``case`` with region 1's keys copied onto region 3's, and descriptors with more ties."""
    source, target = (np.flatnonzero(case.layouts[0].region == g) for g in (1, 3))
    tied = copy.copy(case)
    tied.k = case.k.at[0, target].set(case.k[0, source])
    descriptors = routing.region_descriptors(tied.k, case.meta, case.num_regions)
    assert (descriptors[0, 1] == descriptors[0, 3]).all()
    return tied, descriptors.at[:, 4:7].set(descriptors[:, 2:3])


@pytest.mark.parametrize(
    "route, implementation",
    # Shared routing through Pallas: tests/test_pallas_*.py and the dense cases above.
    [
        (route, implementation)
        for route in ("per_head", "shared")
        for implementation in IMPLEMENTATIONS
        if (route, implementation) != ("shared", "pallas")
    ],
)
def test_few_regions_match_naive_eq_2_to_4(route, implementation):
    case, descriptors = tied(ROUTED)
    kind = np.asarray(case.meta.kind)
    text_or_padding = np.isin(kind, (TokenKind.TEXT, TokenKind.PADDING)).all(axis=0)
    text_decode = np.flatnonzero(text_or_padding & (kind == TokenKind.TEXT).any(axis=0))
    other_decode = case.slots(TokenKind.VISUAL, TokenKind.CONTEXT)[[5, -1]]
    decode = [(i, bound) for i in text_decode[[0, 2, -1]] for bound in (None, 16)]
    decode += [(i, None) for i in other_decode]
    for top_k, explicit, steps in ((1, False, []), (3, True, decode), (40, False, decode)):
        given = descriptors if explicit else None
        expected, chosen = naive_gaze(case, top_k, route, given)
        out, selection = case(
            implementation, top_k=top_k, routing=route, descriptors=given, return_selection=True
        )
        np.testing.assert_allclose(out, expected, atol=1e-5)
        is_text = kind == TokenKind.TEXT
        np.testing.assert_array_equal(np.asarray(selection.region)[is_text], chosen[is_text])
        np.testing.assert_array_equal(selection.valid, chosen >= 0)
        for index, bound in steps:
            step = case.decode(
                index,
                implementation,
                top_k=top_k,
                routing=route,
                descriptors=given,
                max_unrouted_tokens=bound,
            )
            np.testing.assert_allclose(step[:, 0], expected[:, index], atol=1e-5)


def test_ties_resolve_to_the_lowest_region():
    case, descriptors = tied(ROUTED)
    _, selection = case(top_k=16, descriptors=descriptors, return_selection=True)
    region = np.asarray(selection.region)[0, case.slots(TokenKind.TEXT)[-1]]
    for row in region:
        for a, b in ((1, 3), (2, 4), (2, 5), (4, 6)):
            assert np.flatnonzero(row == a)[0] < np.flatnonzero(row == b)[0]


def test_decode_selection_equals_many_query_selection():
    text = ROUTED.slots(TokenKind.TEXT)[-1]
    _, full = ROUTED(top_k=3, return_selection=True)
    _, step = ROUTED.decode(text, top_k=3, max_unrouted_tokens=16, return_selection=True)
    np.testing.assert_array_equal(step.region[:, 0], full.region[:, text])


def test_bfloat16_decode_matches_the_reference():
    case = ROUTED
    q, k, v = (x.astype(jnp.bfloat16) for x in (case.q, case.k, case.v))
    text = case.slots(TokenKind.TEXT)[-1]
    query_meta = jax.tree.map(lambda x: x[:, text : text + 1], case.meta)
    for route in ("per_head", "shared"):
        options = dict(top_k=3, routing=route)
        expected = op(q, k, v, case.meta, case.meta, case.table, **options)[:, text]
        step = op(
            q[:, text : text + 1],
            k,
            v,
            query_meta,
            case.meta,
            case.table,
            implementation="xla",
            max_unrouted_tokens=16,
            **options,
        )
        assert step.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            step[:, 0].astype(np.float32), expected.astype(np.float32), atol=2e-2
        )


def test_decode_reads_a_head_major_cache():
    """``heads_first``: the xla decode reads ``[batch, kv_heads, len, d]`` in place and equals
    the reference, with and without the unrouted bound."""
    case = ROUTED
    text = case.slots(TokenKind.TEXT)[-1]
    query_meta = jax.tree.map(lambda x: x[:, text : text + 1], case.meta)
    k, v = (jnp.swapaxes(x, 1, 2) for x in (case.k, case.v))
    for route in ("per_head", "shared"):
        options = dict(top_k=3, routing=route, heads_first=True)
        expected = op(
            case.q, case.k, case.v, case.meta, case.meta, case.table, top_k=3, routing=route
        )
        for bound in (None, 16):
            step = op(
                case.q[:, text : text + 1],
                k,
                v,
                query_meta,
                case.meta,
                case.table,
                implementation="xla",
                max_unrouted_tokens=bound,
                **options,
            )
            np.testing.assert_allclose(step[:, 0], expected[:, text], atol=1e-5)


def test_decode_of_a_region_at_the_cache_end():
    """A region whose ``m``-row block would pass the cache's end (the xla decode moves the block
    back and masks the rows before the region) equals the reference, in both cache layouts."""
    case = Case([[TextSegment(2), VisualSegment(3, 3), TextSegment(2)]], (2, 2), seed=7)
    text = case.slots(TokenKind.TEXT)[-1]
    end = case.slots(TokenKind.VISUAL)[-1] + 1  # the cache cut after the last region
    assert int(np.max(np.asarray(case.table.start) + case.table.capacity)) > end
    meta = jax.tree.map(lambda x: x[:, :end], case.meta)
    query_meta = jax.tree.map(lambda x: x[:, text : text + 1], case.meta)
    query, k, v = case.q[:, text : text + 1], case.k[:, :end], case.v[:, :end]
    for route in ("per_head", "shared"):
        options = dict(top_k=case.num_regions, routing=route)
        expected = op(query, k, v, query_meta, meta, case.table, **options)
        for heads_first in (False, True):
            cache = (jnp.swapaxes(x, 1, 2) if heads_first else x for x in (k, v))
            step = op(
                query,
                *cache,
                query_meta,
                meta,
                case.table,
                implementation="xla",
                heads_first=heads_first,
                **options,
            )
            np.testing.assert_allclose(step, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Gradients, isolation, padding.


def text_loss(case, implementation, weights, descriptors=None):
    text = np.asarray(case.meta.kind) == TokenKind.TEXT

    def loss(k, v, descriptors):
        out = case(implementation, k=k, v=v, top_k=1, descriptors=descriptors)
        return jnp.sum(jnp.where(text[..., None, None], out * weights, 0.0))

    return loss


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_only_selected_regions_receive_gradient(implementation):
    case = Case([[TextSegment(2), VisualSegment(6, 6), TextSegment(3)]], (2, 2), seed=3)
    weights = jnp.asarray(np.random.default_rng(4).standard_normal(case.q.shape), jnp.float32)
    grad_k, grad_v = jax.grad(text_loss(case, implementation, weights), (0, 1))(
        case.k, case.v, None
    )
    _, selection = case(top_k=1, return_selection=True)
    region = np.asarray(case.meta.region[0])
    chosen = np.zeros((case.num_regions, NUM_KV_HEADS), bool)
    for i in case.slots(TokenKind.TEXT):
        for h in range(NUM_HEADS):
            if selection.valid[0, i, h, 0]:
                chosen[selection.region[0, i, h, 0], h // (NUM_HEADS // NUM_KV_HEADS)] = True
    assert chosen.any() and not chosen.all()
    for grad in (grad_k, grad_v):
        touched = np.abs(np.asarray(grad[0])).max(axis=-1) > 0  # [kv_len, kv_heads]
        visual = case.slots(TokenKind.VISUAL)
        np.testing.assert_array_equal(touched[visual], chosen[region[visual]])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_explicit_descriptors_get_no_gradient(implementation):
    case = Case([[TextSegment(2), VisualSegment(4, 4), TextSegment(3)]], (2, 2), seed=5)
    weights = jnp.ones(case.q.shape)
    descriptors = routing.region_descriptors(case.k, case.meta, case.num_regions)
    grad = jax.grad(text_loss(case, implementation, weights), 2)(case.k, case.v, descriptors)
    assert (grad == 0).all()


PADDED = Case(
    [
        [TextSegment(2), VisualSegment(3, 3), TextSegment(2)],
        [TextSegment(3), VisualSegment(4, 4), TextSegment(2), VisualSegment(2, 3), TextSegment(5)],
    ],
    (2, 2),
    seed=9,
)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_gradients_equal_the_reference(implementation):
    weights = jnp.asarray(np.random.default_rng(6).standard_normal(PADDED.q.shape), jnp.float32)

    def loss(implementation):
        def f(q, k, v):
            return jnp.sum(PADDED(implementation, q=q, k=k, v=v, top_k=2) * weights)

        return jax.grad(f, (0, 1, 2))(PADDED.q, PADDED.k, PADDED.v)

    for a, b in zip(loss("reference"), loss(implementation), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_nan_and_padding_rows_are_zero(implementation):
    valid = np.asarray(PADDED.meta.valid)
    assert not valid.all()
    out = PADDED(implementation, top_k=2)
    assert np.isfinite(out).all() and (np.asarray(out)[~valid] == 0).all()
    grads = jax.grad(
        lambda q, k, v: PADDED(implementation, q=q, k=k, v=v, top_k=2).sum(), (0, 1, 2)
    )(PADDED.q, PADDED.k, PADDED.v)
    for grad in grads:
        assert np.isfinite(grad).all()
        assert (np.asarray(grad)[~valid] == 0).all()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_context_tokens_do_not_see_other_units(implementation):
    case = Case(
        [[TextSegment(2), VisualSegment(3, 3), VisualSegment(3, 3), TextSegment(2)]],
        (2, 2),
        seed=11,
    )
    unit, kind = np.asarray(case.meta.unit[0]), np.asarray(case.meta.kind[0])
    others = (unit != 0)[None, :, None, None]
    rng = np.random.default_rng(12)
    q, k, v = (
        jnp.where(others, x + jnp.asarray(rng.standard_normal(x.shape), jnp.float32), x)
        for x in (case.q, case.k, case.v)
    )
    context = (unit == 0) & (kind == TokenKind.CONTEXT)
    before = case(implementation, top_k=1)
    after = case(implementation, q=q, k=k, v=v, top_k=1)
    np.testing.assert_array_equal(before[:, context], after[:, context])
    assert not np.allclose(before[:, kind == TokenKind.TEXT], after[:, kind == TokenKind.TEXT])


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(top_k=0), "top_k"),
        (dict(top_k=2, routing="per_token"), "routing"),
        (dict(top_k=2, implementation="triton"), "implementation"),
    ],
)
def test_invalid_options_name_the_key(options, match):
    case = PADDED
    with pytest.raises(ValueError, match=match):
        functools.partial(gaze_attention, case.q, case.k, case.v, case.meta, case.meta, case.table)(
            **options
        )


def test_auto_picks_the_platform_s_implementation_and_names_are_checked():
    native = "xla" if jax.default_backend() == "cpu" else "pallas"
    assert resolve_implementation("auto") == native
    np.testing.assert_array_equal(PADDED("auto", top_k=2), PADDED(native, top_k=2))
    with pytest.raises(ValueError, match="implementation must be one of"):
        PADDED("fast", top_k=2)

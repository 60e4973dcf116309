"""Sequence-sharded gaze decode (``kernels/gaze_attention/sharded.py``) against the unsharded op.

The mesh checks need 8 simulated CPU devices, so ``XLA_FLAGS`` must be set before jax starts: they
run once, in a subprocess that executes this file as a script and reports one result per check,
and the tests below assert on those results. The layout helpers and ``attend_selected`` run in
process.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gazejax.gaze.regions import (
    SequenceLayout,
    TextSegment,
    VisualSegment,
    batch_layouts,
    build_layout,
)
from gazejax.gaze.shard_layout import shard_layouts
from kernels.gaze_attention import (
    ATTEND_SELECTED,
    TokenKind,
    TokenMeta,
    check_sharded_layout,
    gaze_attention,
    routing,
    sharded_gaze_decode,
)
from kernels.gaze_attention.reference import attend_selected_reference
from kernels.gaze_attention.xla import attend_selected_xla
from tests.simulated_devices import iter_eqns, print_results, run_checks, run_script

NUM_DEVICES = 8
HLO_COLLECTIVE = re.compile(
    r"=\s*(.*?)\s(all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter"
    r"|collective-broadcast)(?:-start)?\("
)

IMAGE_AND_VIDEO = [
    TextSegment(3),
    VisualSegment(6, 6),
    TextSegment(4),
    VisualSegment(4, 4, frames=3),
    TextSegment(5),
]
TEXT_AROUND = [
    TextSegment(24),
    VisualSegment(4, 6),
    TextSegment(3),
    VisualSegment(3, 3),
    TextSegment(40),
]


@dataclasses.dataclass(frozen=True)
class Spec:
    """One sharded decode step to compare with the unsharded reference."""

    samples: tuple[list, ...] = (IMAGE_AND_VIDEO,)
    region_size: tuple[int, ...] = (2, 2)
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    top_k: int = 3
    routing: str = "per_head"
    query_kind: int = TokenKind.TEXT
    dtype: str = "float32"
    ties: str | None = None  # "copied": some descriptors copied across shards; "all": all zero
    descriptors: bool = True  # False: each shard computes its own from its keys
    bounded: bool = False  # xla: max_unrouted_tokens = the most text + context slots on a shard
    mesh_shape: tuple[int, ...] = (NUM_DEVICES,)  # (sequence,) or (data, sequence)
    heads_first: bool = False  # the decoder's head-major cache [b, kv_heads, len, d]
    seed: int = 0


SPECS = {
    "uneven regions per shard, GQA 2, per head": Spec(),
    "K=1, shared: shards with no region selected": Spec(top_k=1, routing="shared", seed=1),
    "K=all, GQA 4": Spec(top_k=21, num_heads=8, seed=2),
    "K>regions, GQA 1, shared": Spec(top_k=40, num_heads=2, routing="shared", seed=3),
    "text-only shards, bounded unrouted": Spec(
        samples=(TEXT_AROUND,), top_k=2, bounded=True, seed=4
    ),
    "ties across shards, K=all": Spec(ties="copied", top_k=21, seed=5),
    "all scores tied, shared": Spec(ties="all", routing="shared", seed=6),
    "batch of 2 on a data x sequence mesh": Spec(
        samples=(IMAGE_AND_VIDEO, TEXT_AROUND), top_k=2, mesh_shape=(2, 4), seed=7
    ),
    "bfloat16": Spec(dtype="bfloat16", seed=8),
    "descriptors from the local keys": Spec(descriptors=False, seed=9),
    "context query (own unit, across shards)": Spec(query_kind=TokenKind.CONTEXT, seed=10),
    "visual query (dense, across shards)": Spec(query_kind=TokenKind.VISUAL, seed=11),
    "head-major cache, bounded unrouted, batch 2": Spec(
        samples=(TEXT_AROUND, IMAGE_AND_VIDEO),
        bounded=True,
        heads_first=True,
        mesh_shape=(2, 4),
        seed=12,
    ),
    "head-major cache, descriptors from the local keys": Spec(
        descriptors=False, heads_first=True, routing="shared", seed=13
    ),
}
IMPLEMENTATIONS = tuple(ATTEND_SELECTED)
# Interpret-mode Pallas compiles slowly on CPU (seconds per step): a subset of the specs.
PALLAS_SPECS = (
    "K>regions, GQA 1, shared",
    "text-only shards, bounded unrouted",
    "batch of 2 on a data x sequence mesh",
    "head-major cache, bounded unrouted, batch 2",
)


def build(spec: Spec):
    """Inputs of one decode step on a layout sharded over the mesh's sequence axis."""
    num_shards = spec.mesh_shape[-1]
    layouts = shard_layouts(
        [build_layout(s, spec.region_size, 2) for s in spec.samples], num_shards
    )
    kv_meta, table = batch_layouts(layouts)
    rng = np.random.default_rng(spec.seed)
    dtype = jnp.dtype(spec.dtype)
    shape = (len(layouts), layouts[0].length, spec.num_kv_heads, spec.head_dim)
    key, value = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))
    query = jnp.asarray(
        rng.standard_normal((len(layouts), 1, spec.num_heads, spec.head_dim)), dtype
    )
    # The query: the last token of its kind (by position) in each sample, as cached.
    kind, position = np.asarray(kv_meta.kind), np.asarray(kv_meta.position)
    slot = np.argmax(np.where(kind == spec.query_kind, position, -1), axis=1)
    query_meta = jax.tree.map(lambda x: jnp.take_along_axis(x, slot[:, None], axis=1), kv_meta)
    descriptors = routing.region_descriptors(key, kv_meta, table.num_regions)
    if spec.ties == "copied":  # region 0's descriptor onto a region of every other shard
        owners = np.arange(table.num_regions) // (table.num_regions // num_shards)
        used = np.asarray(table.length[0]) > 0
        targets = [
            int(np.flatnonzero(used & (owners == s))[-1])
            for s in range(1, num_shards)
            if (used & (owners == s)).any()
        ]
        descriptors = descriptors.at[:, np.asarray(targets)].set(descriptors[:, :1])
    elif spec.ties == "all":
        descriptors = jnp.zeros_like(descriptors)
    unrouted = (kind == TokenKind.TEXT) | (kind == TokenKind.CONTEXT)
    return dict(
        inputs=(query, key, value, query_meta, kv_meta, table),
        descriptors=descriptors,
        bound=int(unrouted.reshape(len(layouts), num_shards, -1).sum(-1).max()),
        layouts=layouts,
    )


# ----------------------------------------------------------------------------------------------
# Mesh checks (run in the subprocess, on NUM_DEVICES simulated CPU devices).


def make_mesh(shape):
    names = ("sequence",) if len(shape) == 1 else ("data", "sequence")
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


decode = jax.jit(
    sharded_gaze_decode,
    static_argnames=(
        "mesh",
        "top_k",
        "axis",
        "batch_axis",
        "routing",
        "scale",
        "implementation",
        "max_unrouted_tokens",
        "heads_first",
    ),
)
oracle = jax.jit(gaze_attention, static_argnames=("top_k", "routing", "return_selection"))


def check_against_unsharded(spec: Spec, implementation: str) -> None:
    data = build(spec)
    query, key, value, query_meta, kv_meta, table = data["inputs"]
    num_shards = spec.mesh_shape[-1]
    check_sharded_layout(kv_meta, table, num_shards)
    expected, chosen = oracle(
        *data["inputs"],
        top_k=spec.top_k,
        routing=spec.routing,
        descriptors=data["descriptors"],
        return_selection=True,
    )
    cache = (jnp.swapaxes(x, 1, 2) if spec.heads_first else x for x in (key, value))
    out, selection = decode(
        query,
        *cache,
        query_meta,
        kv_meta,
        table,
        data["descriptors"] if spec.descriptors else None,
        mesh=make_mesh(spec.mesh_shape),
        batch_axis="data" if len(spec.mesh_shape) > 1 else None,
        top_k=spec.top_k,
        routing=spec.routing,
        implementation=implementation,
        max_unrouted_tokens=data["bound"] if spec.bounded else None,
        heads_first=spec.heads_first,
    )
    assert out.dtype == query.dtype and out.shape == query.shape
    tolerance = 1e-2 if spec.dtype == "bfloat16" else 1e-5
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=tolerance, rtol=0
    )
    np.testing.assert_array_equal(selection.region, chosen.region)
    np.testing.assert_array_equal(selection.valid, chosen.valid)
    assert_coverage(spec, data, chosen, num_shards)


def assert_coverage(spec: Spec, data, chosen, num_shards: int) -> None:
    """The situations a spec is named after do occur."""
    table = data["inputs"][5]
    per_shard = np.asarray(table.length > 0).reshape(len(data["layouts"]), num_shards, -1)
    regions_held = per_shard.sum(-1)
    assert len(set(regions_held[0].tolist())) > 1, "shards hold different numbers of regions"
    region, valid = np.asarray(chosen.region), np.asarray(chosen.valid)
    owner = np.where(valid, region // per_shard.shape[-1], -1)
    if spec.query_kind == TokenKind.TEXT:
        assert valid.any()
        selected_somewhere = np.zeros((len(region), num_shards), bool)
        for b in range(len(region)):
            selected_somewhere[b, owner[b][valid[b]]] = True
        if spec.top_k == 1:  # shards holding regions, none selected by any head
            assert ((regions_held > 0) & ~selected_somewhere).any()
    if spec.top_k > per_shard.sum(-1).sum(-1).max():
        assert not valid.all()  # fewer regions than K: extra slots invalid
    if spec.samples[0] is TEXT_AROUND:
        kind = np.asarray(data["inputs"][4].kind[0]).reshape(num_shards, -1)
        text_only = (regions_held[0] == 0) & (kind == TokenKind.TEXT).any(-1)
        assert text_only.any(), "a shard holds only text"


def check_only_small_collectives(implementation: str) -> None:
    """Keys and values stay on their shard: the step's collectives carry [.., K] candidates
    and [b, 1, h, d + 1] partial results only, in the traced body and in the compiled HLO."""
    spec = Spec(
        samples=([TextSegment(5), VisualSegment(12, 12), TextSegment(7)],),
        region_size=(3, 3),
        head_dim=16,
        top_k=3,
    )
    data = build(spec)
    query, key, value, query_meta, kv_meta, table = data["inputs"]
    mesh = make_mesh(spec.mesh_shape)
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "sequence"))
    placed = [jax.device_put(x, split) for x in (key, value, kv_meta, table, data["descriptors"])]
    args = (query, placed[0], placed[1], query_meta, placed[2], placed[3], placed[4])
    options = dict(mesh=mesh, top_k=spec.top_k, implementation=implementation)
    batch, _, heads, dim = query.shape
    local_k = min(spec.top_k, table.num_regions // NUM_DEVICES)

    collectives = {
        "all_gather",
        "psum",
        "pmax",
        "psum_invariant",
        "ppermute",
        "all_to_all",
        "reduce_scatter",
        "psum_scatter",
        "all_gather_invariant",
        "pbroadcast",
    }
    found = sorted(
        (eqn.primitive.name, tuple(eqn.invars[0].aval.shape))
        for eqn in iter_eqns(jax.make_jaxpr(lambda *a: decode(*a, **options))(*args).jaxpr)
        if eqn.primitive.name in collectives
    )
    assert found == sorted(
        [
            ("all_gather", (batch, 1, heads, local_k, 2)),
            ("pmax", (batch, 1, heads)),
            ("psum", (batch, 1, heads, dim + 1)),
        ]
    ), found

    hlo = decode.lower(*args, **options).compile().as_text()
    limit = max(batch * heads * NUM_DEVICES * local_k * 2, batch * heads * (dim + 1))
    cache_per_shard = key.size // NUM_DEVICES
    assert cache_per_shard > 4 * limit
    ops = [m for m in map(HLO_COLLECTIVE.search, hlo.splitlines()) if m]
    assert {m[2] for m in ops} == {"all-gather", "all-reduce"}, [m[0] for m in ops]
    for m in ops:  # every array of the (possibly tuple) result type
        dims = re.findall(r"\[([\d,]*)\]", m[1])
        assert sum(int(np.prod([int(n) for n in d.split(",") if n])) for d in dims) <= limit, m[0]


MESH_CHECKS = {
    **{
        f"{name} [{impl}]": (check_against_unsharded, spec, impl)
        for name, spec in SPECS.items()
        for impl in IMPLEMENTATIONS
        if impl != "pallas" or name in PALLAS_SPECS
    },
    **{
        f"only small collectives [{impl}]": (check_only_small_collectives, impl)
        for impl in ("reference", "xla")
    },  # the exchange is sharded.py's, whatever attends
}


def run_mesh_checks() -> dict[str, str]:
    assert jax.device_count() == NUM_DEVICES, jax.devices()
    return run_checks(MESH_CHECKS)


@pytest.fixture(scope="module")
def mesh_results():
    return run_script(__file__, NUM_DEVICES)


@pytest.mark.parametrize("name", MESH_CHECKS)
def test_on_8_devices(mesh_results, name):
    assert mesh_results[name] == "ok", mesh_results[name]


# ----------------------------------------------------------------------------------------------
# In process: layout contract and attend_selected.


def _by_position(layout: SequenceLayout) -> dict[int, tuple[int, int, int]]:
    return {
        int(p): (int(k), int(u), int(r))
        for k, u, r, p in zip(layout.kind, layout.unit, layout.region, layout.position, strict=True)
        if p >= 0
    }


@pytest.mark.parametrize("pad_regions", [False, True])
def test_shard_layouts_keep_tokens_and_place_whole_regions(pad_regions):
    original = [build_layout(s, (2, 2), 2, pad_regions) for s in (IMAGE_AND_VIDEO, TEXT_AROUND)]
    sharded = shard_layouts(original, 4)
    meta, table = batch_layouts(sharded)
    check_sharded_layout(meta, table, 4)
    assert len({x.length for x in sharded}) == 1 and sharded[0].length % 4 == 0
    regions_per_shard = sharded[0].num_regions // 4
    for before, after in zip(original, sharded, strict=True):
        old, new = _by_position(before), _by_position(after)
        assert old.keys() == new.keys()
        # Same tokens; regions renumbered shard-major, keeping their order.
        pairs = sorted({(o[2], new[p][2]) for p, o in old.items() if o[2] >= 0})
        assert [o for o, _ in pairs] == list(range(before.num_regions))
        assert [n for _, n in pairs] == sorted(n for _, n in pairs)
        assert all((o[0], o[1]) == new[p][:2] for p, o in old.items())
        # Extents agree with the slots.
        for g in range(after.num_regions):
            slots = np.flatnonzero(after.region == g)
            assert after.region_length[g] == slots.size
            if slots.size:
                assert after.region_start[g] == slots[0] and np.all(np.diff(slots) == 1)
                assert g // regions_per_shard == slots[0] // (after.length // 4)
        if pad_regions:  # every region keeps its m slots (with its padding) on one shard
            start = after.region_start[after.region_length > 0]
            assert np.all(
                start // (after.length // 4)
                == (start + before.region_capacity - 1) // (after.length // 4)
            )


def test_shard_layout_options_and_errors():
    layout = build_layout(IMAGE_AND_VIDEO, (2, 2), 2)
    roomy = shard_layouts([layout], 4, shard_length=64, regions_per_shard=16)[0]
    assert roomy.length == 256 and roomy.num_regions == 64
    assert (roomy.kind[128:] == TokenKind.PADDING).all()  # room for decoded tokens
    with pytest.raises(ValueError, match="exceeds shard_length"):
        shard_layouts([layout], 4, shard_length=3)
    with pytest.raises(ValueError, match="do not fit"):
        shard_layouts([layout], 2, shard_length=20)
    with pytest.raises(ValueError, match="regions_per_shard"):
        shard_layouts([layout], 4, regions_per_shard=1)
    meta, table = batch_layouts([layout])  # not sharded: regions straddle shard boundaries
    with pytest.raises(ValueError, match="straddles|outside"):
        check_sharded_layout(
            jax.tree.map(
                lambda x: jnp.pad(x, ((0, 0), (0, -x.shape[1] % 8)), constant_values=-1), meta
            ),
            jax.tree.map(lambda x: jnp.pad(x, ((0, 0), (0, -x.shape[1] % 8))), table),
            8,
        )


def test_sharded_decode_rejects_bad_options():
    data = build(Spec(mesh_shape=(1,)))
    mesh = make_mesh((1,))
    call = lambda **o: sharded_gaze_decode(*data["inputs"], None, mesh=mesh, **o)  # noqa: E731
    with pytest.raises(ValueError, match="implementation"):
        call(top_k=2, implementation="dense")
    with pytest.raises(ValueError, match="axis"):
        call(top_k=2, axis="tensor")
    with pytest.raises(ValueError, match="top_k"):
        call(top_k=0)


@pytest.mark.parametrize("routing_kind", ["per_head", "shared"])
def test_attend_selected_returns_normalised_output_and_lse(routing_kind):
    spec = Spec(samples=(IMAGE_AND_VIDEO, TEXT_AROUND), mesh_shape=(1,), routing=routing_kind)
    data = build(spec)
    query, key, value, query_meta, kv_meta, table = data["inputs"]
    # A second query row that sees nothing (padding): out 0, lse -inf.
    nothing = jax.tree.map(lambda x: x.at[1].set(-1), query_meta)
    expected, selection = oracle(
        query,
        key,
        value,
        nothing,
        kv_meta,
        table,
        top_k=3,
        routing=routing_kind,
        descriptors=data["descriptors"],
        return_selection=True,
    )
    scale = spec.head_dim**-0.5
    results = [
        jax.jit(f, static_argnames=("routing", "scale", "max_unrouted_tokens"))(
            query,
            key,
            value,
            nothing,
            kv_meta,
            table,
            selection,
            routing=routing_kind,
            scale=scale,
            max_unrouted_tokens=bound,
        )
        for f, bound in (
            (attend_selected_reference, None),
            (attend_selected_xla, None),
            (attend_selected_xla, data["bound"]),
        )
    ]
    lse_naive = naive_lse(query, key, nothing, kv_meta, selection, scale)
    for out, lse in results:
        assert out.dtype == lse.dtype == jnp.float32
        np.testing.assert_allclose(out, expected, atol=1e-5)
        np.testing.assert_allclose(lse, lse_naive, atol=1e-5)
        assert (np.asarray(out[1]) == 0).all() and np.isneginf(lse[1]).all()


def naive_lse(query, key, query_meta: TokenMeta, kv_meta: TokenMeta, selection, scale):
    """log Σ exp(q·k·scale) over the keys each text query head sees, NumPy float64."""
    q, k = np.asarray(query, np.float64), np.asarray(key, np.float64)
    kind, region, pos = (np.asarray(x) for x in (kv_meta.kind, kv_meta.region, kv_meta.position))
    batch, _, heads, _ = q.shape
    group = heads // k.shape[2]
    lse = np.full((batch, 1, heads), -np.inf)
    for b in range(batch):
        if query_meta.kind[b, 0] != TokenKind.TEXT:
            continue
        for h in range(heads):
            chosen = np.asarray(selection.region[b, 0, h])[np.asarray(selection.valid[b, 0, h])]
            sees = ((kind[b] == TokenKind.TEXT) | (kind[b] == TokenKind.CONTEXT)) & (
                pos[b] <= int(query_meta.position[b, 0])
            )
            sees |= (kind[b] == TokenKind.VISUAL) & np.isin(region[b], chosen)
            logits = k[b, sees, h // group] @ q[b, 0, h] * scale
            lse[b, 0, h] = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
    return lse


if __name__ == "__main__":
    print_results(run_mesh_checks())

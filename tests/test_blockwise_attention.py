"""Blockwise attention does only the causal work and equals masked dense attention."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from gazejax.gaze.regions import TextSegment, VisualSegment, batch_layouts, build_layout
from gazejax.models.attention import (
    causal_attention,
    decode_attention,
    dense_attention,
    dense_visibility,
)
from kernels.gaze_attention import (
    TokenKind,
    TokenMeta,
    blockwise,
    gaze_attention,
    region_descriptors,
)

HEADS, KV_HEADS, DIM = 4, 2, 8
Q_BLOCK, KV_BLOCK = 8, 4


def _layout_meta():
    """Two samples of different layouts (padding, context tokens, two units) as one batch."""
    samples = [
        [TextSegment(3), VisualSegment(3, 4), TextSegment(4)],
        [TextSegment(2), VisualSegment(2, 3), TextSegment(1), VisualSegment(3, 3), TextSegment(3)],
    ]
    layouts = [build_layout(s, (2, 2), 2) for s in samples]
    return batch_layouts(layouts)


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _small_blocks(monkeypatch):
    monkeypatch.setattr(blockwise, "QUERY_BLOCK", Q_BLOCK)
    monkeypatch.setattr(blockwise, "KV_BLOCK", KV_BLOCK)


def test_causal_attention_equals_jax_and_its_gradients_the_masked_dense(monkeypatch):
    _small_blocks(monkeypatch)
    meta, _ = _layout_meta()
    batch, length = meta.kind.shape
    q = _random((batch, length, HEADS, DIM), 1)
    k, v = (_random((batch, length, KV_HEADS, DIM), s) for s in (2, 3))
    mask = dense_visibility(meta, meta)
    empty = ~np.asarray(mask).any(-1)
    assert empty.any() and not empty.all()  # padding rows see nothing
    ours = jax.jit(causal_attention)(q, k, v, meta, meta)
    theirs = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    np.testing.assert_allclose(np.asarray(ours)[~empty], np.asarray(theirs)[~empty], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ours)[empty], 0.0)
    weights = _random(q.shape, 4)

    def grads(attend):
        return jax.jit(jax.grad(lambda *x: jnp.sum(attend(*x) * weights), (0, 1, 2)))(q, k, v)

    expected = grads(lambda q, k, v: dense_attention(q, k, v, mask))
    for ours, theirs in zip(
        grads(lambda *x: causal_attention(*x, meta, meta)), expected, strict=True
    ):
        assert np.isfinite(ours).all()
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def _prefill_cache(meta: TokenMeta, written: int, max_len: int):
    """A preallocated cache of ``max_len`` slots holding ``meta``'s first ``written`` slots;
    keys and values of wholly unwritten key blocks are NaN (nothing may read them)."""
    batch = meta.kind.shape[0]
    cache_meta = jax.tree.map(
        lambda x: jnp.full((batch, max_len), -1, jnp.int32).at[:, :written].set(x[:, :written]),
        meta,
    )
    k, v = (_random((batch, max_len, KV_HEADS, DIM), s) for s in (5, 6))
    unread = np.arange(max_len) >= -(-written // KV_BLOCK) * KV_BLOCK
    assert unread.sum() >= 2 * KV_BLOCK
    k, v = (jnp.where(unread[None, :, None, None], jnp.nan, x) for x in (k, v))
    return cache_meta, k, v, unread


def test_prefill_chunk_reads_only_the_written_prefix(monkeypatch):
    """A chunk of queries against a preallocated cache skips the unwritten tail (NaN there)."""
    _small_blocks(monkeypatch)
    meta, table = _layout_meta()
    length = meta.kind.shape[1]
    max_len = length + 3 * KV_BLOCK
    cache_meta, k, v, unread = _prefill_cache(meta, length, max_len)
    start = length - 11  # the last chunk: queries at slots [start, length)
    q = _random((meta.kind.shape[0], length - start, HEADS, DIM), 7)
    q_meta = jax.tree.map(lambda x: x[:, start:], meta)
    read = jnp.asarray(~unread)[None, :, None, None]
    clean_k, clean_v = (jnp.where(read, x, 0.0) for x in (k, v))

    dense = jax.jit(causal_attention)(q, k, v, q_meta, cache_meta)
    expected = dense_attention(q, clean_k, clean_v, dense_visibility(q_meta, cache_meta))
    np.testing.assert_allclose(dense, expected, atol=1e-5)

    gaze = jax.jit(gaze_attention, static_argnames=("top_k", "implementation", "return_selection"))
    options = dict(top_k=2, return_selection=True)
    descriptors = region_descriptors(clean_k, cache_meta, table.num_regions)
    args = (q_meta, cache_meta, table)
    ours, chosen = gaze(q, k, v, *args, implementation="xla", descriptors=descriptors, **options)
    reference, same = gaze(
        q, clean_k, clean_v, *args, implementation="reference", descriptors=descriptors, **options
    )
    assert (np.asarray(chosen.valid)).any()
    np.testing.assert_array_equal(chosen.region, same.region)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_only_causal_block_pairs_are_live():
    """Text of 8 blocks: the pairs on or below the diagonal, none in a padded cache tail."""
    positions = np.arange(8 * KV_BLOCK)
    meta = TokenMeta(
        kind=jnp.where(positions < 6 * KV_BLOCK, TokenKind.TEXT, TokenKind.PADDING)[None],
        unit=jnp.full((1, positions.size), -1),
        region=jnp.full((1, positions.size), -1),
        position=jnp.where(positions < 6 * KV_BLOCK, positions, -1)[None],
    )
    blocks = blockwise._blocks(meta, KV_BLOCK, TokenKind.PADDING)
    live = np.asarray(blockwise._live_pairs(blocks, blocks))
    expected = np.tril(np.ones((8, 8), bool))
    expected[6:] = expected[:, 6:] = False
    np.testing.assert_array_equal(live, expected)


def test_decode_attention_equals_jax():
    """A decode step's dense attention over the cache rows (GQA; a fully masked sample gives
    zeros)."""
    q = _random((2, 1, HEADS, DIM), 9)
    k, v = (_random((2, 37, KV_HEADS, DIM), s) for s in (10, 11))
    mask = jnp.asarray(np.random.default_rng(12).random((2, 1, 37)) < 0.7).at[1].set(False)
    rows = (jnp.swapaxes(x, 1, 2).reshape(2 * KV_HEADS, 37, DIM) for x in (k, v))
    ours = jax.jit(decode_attention)(q, *rows, mask)
    theirs = jax.nn.dot_product_attention(q[:1], k[:1], v[:1], mask=mask[:1, None])
    np.testing.assert_allclose(ours[:1], theirs, atol=1e-5)
    np.testing.assert_array_equal(ours[1], 0.0)


def _cache_sized_copies(step, cache, *args) -> int:
    """Copies or transposes as large as ``cache`` in the compiled, cache-donating ``step``."""
    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(cache, cache, *args).compile().as_text()
    count = 0
    for line in hlo.splitlines():
        found = re.search(r"= f32\[([\d,]+)\]\S* (copy|transpose)\(", line)
        if found and np.prod([int(d) for d in found.group(1).split(",")]) >= cache.size:
            count += 1
    return count


def test_decode_steps_update_the_cache_without_copying_it():
    """Dense and gaze (xla) decode steps write the new key into the cache rows (one per KV
    head) in place and read them as they are: no copy or transpose of the cache (a gaze step
    once copied it into its region loop; at a model's sizes a length-major cache was transposed
    for the dense scores, and a [batch, kv_heads, ...] one copied for the write)."""
    meta, table = _layout_meta()
    meta, table = jax.tree.map(lambda x: x[:1], (meta, table))
    length = meta.kind.shape[1]
    cache = _random((KV_HEADS, length, DIM), 13)
    q = _random((1, 1, HEADS, DIM), 14)
    slot = length - 1
    q_meta = jax.tree.map(lambda x: x[:, slot:], meta)

    def written(keys, values, new):
        return (jax.lax.dynamic_update_slice(x, new, (0, slot, 0)) for x in (keys, values))

    def dense_step(keys, values, new):
        keys, values = written(keys, values, new)
        return decode_attention(q, keys, values, dense_visibility(q_meta, meta)), keys, values

    def gaze_step(keys, values, new, routing):
        keys, values = written(keys, values, new)
        descriptors = jnp.zeros((1, table.num_regions, KV_HEADS, DIM))
        out = gaze_attention(
            q,
            keys[None],
            values[None],
            q_meta,
            meta,
            table,
            top_k=2,
            routing=routing,
            descriptors=descriptors,
            implementation="xla",
            max_unrouted_tokens=12,
            heads_first=True,
        )
        return out, keys, values

    new = cache[:, :1]
    assert _cache_sized_copies(dense_step, cache, new) == 0
    for routing in ("per_head", "shared"):
        assert _cache_sized_copies(functools.partial(gaze_step, routing=routing), cache, new) == 0

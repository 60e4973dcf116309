"""Decode-step latency: dense attention vs gaze attention over one KV cache, side by side.

One new text token (16 query heads, 8 KV heads, head_dim 128) attends to a cache of
``32 text + N visual (frames of 6×6 regions, 4 context tokens each) + 32 text`` tokens, held as
the decoder holds it (head-major ``[1, kv_heads, slots, d]``, slots rounded up by
``decoder.cache_slots``, the tail padding) and read in place by every implementation. Gaze
selects K regions with ``K·m ≈ 16 %`` of N. Dense is a plain einsum attention over the whole
cache (not ``jax.nn.dot_product_attention``, which is slow on CPU): the fastest of two einsum
orders and a broadcast-multiply-sum formulation, timed in the same loop.

    python benchmarks/decode_attention.py                      # the full table
    python benchmarks/decode_attention.py --sizes 4608 --dtypes float32 --quick

Prints a table and writes one JSON record per case (``--out``). ``byte_bound`` is the bytes dense
reads over the bytes gaze must read (selected regions, text and context, descriptors, metadata);
``speedup`` is measured dense time over gaze time.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from dense_reference import dense_decode, filled_slots
from timing import median_ms
from visual_units import visual_segments

from gazejax.gaze import (
    TextSegment,
    batch_layouts,
    build_layout,
    gaze_kv_size,
)
from gazejax.models.decoder import cache_slots
from kernels.gaze_attention import TokenKind, TokenMeta, gaze_attention, region_descriptors

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128
REGION = (6, 6, 1)
NUM_CONTEXT, TEXT_TOKENS, KV_FRACTION = 4, 32, 0.16


def dense_broadcast(query, key, value, cache):
    """The same as :func:`dense_reference.dense_decode` by broadcast-multiply-sum (faster on
    XLA:CPU)."""
    batch, _, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    q = query.reshape(batch, num_kv_heads, num_heads // num_kv_heads, 1, head_dim)
    logits = (q.astype(jnp.float32) * key[:, :, None]).sum(-1)  # [b, kv_heads, g, slots]
    logits = jnp.where(filled_slots(key, cache), logits * head_dim**-0.5, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = (probs[..., None] * value[:, :, None]).sum(-2)  # [b, kv_heads, g, d]
    return out.reshape(query.shape).astype(query.dtype)


def dense_cache_first(query, key, value, cache):
    """The same as :func:`dense_reference.dense_decode` with the cache the products' left
    operand (scores ``[b, kv_heads, slots, g]``: faster on XLA:CPU in float32, slower in
    bfloat16)."""
    batch, _, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    q = query[:, 0].reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("bkld,bkgd->bklg", key, q, preferred_element_type=jnp.float32)
    logits = jnp.where(filled_slots(key, cache)[:, None], logits * head_dim**-0.5, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-2).astype(value.dtype)
    out = jnp.einsum("bkld,bklg->bkgd", value, probs, preferred_element_type=jnp.float32)
    return out.reshape(query.shape).astype(query.dtype)


def gaze_step(query, key, value, cache, **options):
    """One decode step of gaze attention; ``cache`` holds metadata, regions and descriptors."""
    return gaze_attention(
        query,
        key,
        value,
        cache["query_meta"],
        cache["kv_meta"],
        cache["regions"],
        descriptors=cache["descriptors"],
        heads_first=True,
        **options,
    )


def run_size(n_visual: int, dtype: str, routings, impls, reps: int) -> list[dict]:
    """Times dense and each gaze implementation on one cache; one record per (routing, impl)."""
    layout = build_layout(
        [TextSegment(TEXT_TOKENS), *visual_segments(n_visual), TextSegment(TEXT_TOKENS)],
        REGION,
        NUM_CONTEXT,
    )
    length, regions, m = layout.length, layout.num_regions, layout.region_capacity
    slots = cache_slots(length)
    kv_meta, table = batch_layouts([layout], length=slots)
    top_k = max(1, round(KV_FRACTION * n_visual / m))
    unrouted = 2 * TEXT_TOKENS + NUM_CONTEXT * layout.num_units
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    key, value = (normal(1, slots, NUM_KV_HEADS, HEAD_DIM) for _ in range(2))
    query = normal(1, 1, NUM_HEADS, HEAD_DIM)
    descriptors = region_descriptors(key, kv_meta, regions)
    key, value = (jnp.swapaxes(x, 1, 2) for x in (key, value))  # the decoder's cache
    query_meta = TokenMeta(
        *(jnp.asarray([[x]], jnp.int32) for x in (TokenKind.TEXT, -1, -1, length))
    )
    cache = dict(
        kv_meta=kv_meta,
        regions=table,
        descriptors=descriptors,
        query_meta=query_meta,
        filled=jnp.int32(length),
    )
    itemsize = jnp.dtype(dtype).itemsize
    dense_bytes = 2 * length * NUM_KV_HEADS * HEAD_DIM * itemsize
    dense = [jax.jit(f) for f in (dense_decode, dense_cache_first, dense_broadcast)]

    records = []
    for route in routings:
        selections = NUM_HEADS if route == "per_head" else NUM_KV_HEADS
        gaze_bytes = (
            2 * selections * top_k * m * HEAD_DIM * itemsize
            + 2 * unrouted * NUM_KV_HEADS * HEAD_DIM * itemsize
            + descriptors.size * descriptors.dtype.itemsize
            + 4 * (length + 3 * regions)
        )
        gaze = [
            jax.jit(
                functools.partial(
                    gaze_step,
                    top_k=top_k,
                    routing=route,
                    implementation=impl,
                    max_unrouted_tokens=unrouted if impl != "reference" else None,
                )
            )
            for impl in impls
        ]
        times = median_ms([*dense, *gaze], (query, key, value, cache), reps)
        dense_ms = min(times[:3])
        for impl, ms in zip(impls, times[3:], strict=True):
            records.append(
                dict(
                    impl=impl,
                    dtype=dtype,
                    routing=route,
                    n_visual=n_visual,
                    top_k=top_k,
                    region_size=m,
                    kv_size=gaze_kv_size(top_k, m, NUM_CONTEXT, layout.num_units),
                    median_ms=ms,
                    dense_median_ms=dense_ms,
                    speedup=dense_ms / ms,
                    dense_einsum_ms=times[0],
                    dense_cache_first_ms=times[1],
                    dense_broadcast_ms=times[2],
                    dense_bytes=dense_bytes,
                    gaze_bytes=gaze_bytes,
                    byte_bound=dense_bytes / gaze_bytes,
                )
            )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4608, 16384, 65536])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--routings", nargs="+", default=["per_head", "shared"])
    parser.add_argument("--impls", nargs="+", default=["xla", "reference"])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="5 timed repetitions")
    parser.add_argument("--out", default="decode_attention.json")
    args = parser.parse_args()
    reps = 5 if args.quick else args.reps

    print(
        f"device: {jax.devices()[0].device_kind}; heads {NUM_HEADS}/{NUM_KV_HEADS}, "
        f"head_dim {HEAD_DIM}, region {REGION}, |C| {NUM_CONTEXT}"
    )
    header = (
        f"{'impl':9} {'dtype':8} {'routing':8} {'N':>6} {'K':>4} {'dense ms':>9} "
        f"{'gaze ms':>8} {'speedup':>7} {'bytes bound':>11} {'ratio':>5}"
    )
    print(header)
    records = []
    for n_visual in args.sizes:
        for dtype in args.dtypes:
            for r in run_size(n_visual, dtype, args.routings, args.impls, reps):
                records.append(r)
                print(
                    f"{r['impl']:9} {r['dtype']:8} {r['routing']:8} {r['n_visual']:>6} "
                    f"{r['top_k']:>4} {r['dense_median_ms']:>9.2f} {r['median_ms']:>8.2f} "
                    f"{r['speedup']:>7.2f} {r['byte_bound']:>11.2f} "
                    f"{r['speedup'] / r['byte_bound']:>5.2f}",
                    flush=True,
                )
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()

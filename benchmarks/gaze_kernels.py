"""Gaze-attention kernels: decode bytes, time and bandwidth; training time and peak memory.

Qwen3-4B-like attention (32 query heads, 8 KV heads, head_dim 128), batch 1, regions 6×6
(m = 36), |C| = 4 context tokens per 24×24 visual unit (576 tokens; any N >= 108: the remainder
becomes one or two smaller units, ``visual_units.py``), K = 20. Everything runs side by side in
one process; times are medians of interleaved repetitions. A case that fails (out of memory, a
compile error) becomes a row saying so, and the run goes on.

Decode (one text query after ``32 text + N visual + 32 text`` cached tokens, in the decoder's
head-major cache, ``[1, kv_heads, slots, d]`` with the slots rounded up as the decoder allocates
them): per N and routing,
``dense`` (einsum/softmax over the whole cache), ``cudnn`` (on GPU: ``jax.nn.dot_product_attention``
with cuDNN's fused kernel; a row notes where cuDNN has none), gaze ``xla`` and gaze ``pallas``
(the flash-decoding kernel, default splits). ``must-read``
is the theoretical floor in bytes: dense reads all K/V; gaze reads the text and context K/V, the
K/V of the regions selected (counted from the actual selection, deduplicated per KV head: a region
chosen by several query heads of a GQA group is read once) and the region descriptors it scores.
``reads`` is what the implementation fetches (xla: per selecting head, no dedup; pallas: whole
windows of 64 rows, ``pallas_decode.window``). ``GB/s`` is must-read bytes over time.

Training (all ``L = 32 text + N visual + |C|·units + 2016 text`` tokens are queries, 2048 text
queries): forward + backward (``grad`` of ``sum(out · w)`` w.r.t. q, k, v) of dense causal
attention (einsum, full score matrix; plus ``jax.nn.dot_product_attention`` on GPU/TPU as
``sdpa`` (XLA's choice) and ``cudnn`` (cuDNN's fused flash attention, GPU)) and gaze
``xla`` / ``pallas``. Peak memory is the compiled executable's ``memory_analysis()``
(arguments + outputs + temporaries - aliased). The floor is FLOPs: ``4·d·Σ visible (query, head)
pairs`` forward, ×2.5 forward + backward (dense: causal; gaze: from the actual selection).
A case whose estimated time (computed FLOPs over a rate calibrated on this device) exceeds
``--max-seconds``, or whose compiled memory exceeds the device's, is compiled (memory) but not
run, and the row says so.

On CPU the Pallas kernels run in the interpreter: their rows check correctness (max error
against the reference / xla) and report no time ("interpret mode: not a speed").

    python benchmarks/gaze_kernels.py                 # 4608 and 16384 visual tokens
    python benchmarks/gaze_kernels.py --quick         # CPU: smaller training cases, fewer reps
    python benchmarks/gaze_kernels.py --sizes 4608 --routings shared --out /tmp/k.json
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from dense_reference import cudnn_decode, dense_decode
from timing import median_ms
from visual_units import visual_segments

from gazejax.gaze import TextSegment, batch_layouts, build_layout
from gazejax.models.decoder import cache_slots
from kernels.gaze_attention import (
    TokenKind,
    TokenMeta,
    gaze_attention,
    pallas_decode,
    pallas_train,
    routing,
)

HEADS = (32, 8, 128)  # query heads, KV heads, head_dim
REGION = (6, 6, 1)
NUM_CONTEXT, TOP_K = 4, 20
DECODE_TEXT = 32  # text tokens before and after the visual tokens of the decode cache
TRAIN_TEXT, TEXT_BEFORE = 2048, 32
INTERPRET = "interpret mode: not a speed"

# Peak HBM GB/s and dense bf16 TFLOP/s of devices (public spec sheets), for the time floors;
# --peak-gbps / --peak-tflops override. Unknown devices (CPUs) get no time floor.
PEAKS = {
    "H100 PCIe": (2000, 756),
    "H100": (3350, 989),
    "H200": (4800, 989),
    "A100": (2039, 312),
    "TPU v4": (1228, 275),
    "TPU v5 lite": (819, 197),
    "TPU v5e": (819, 197),
    "TPU v5p": (2765, 459),
    "TPU v6 lite": (1640, 918),
}


# ----------------------------------------------------------------------------------------------
# Shared helpers.


def device_info(args) -> dict:
    device = jax.devices()[0]
    kind = device.device_kind
    gbps, tflops = next((v for k, v in PEAKS.items() if k in kind), (None, None))
    limit = None
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        limit = int(stats["bytes_limit"])
    elif device.platform == "cpu":
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return dict(
        device=f"{device.platform}:{kind}",
        platform=device.platform,
        peak_gbps=args.peak_gbps or gbps,
        peak_tflops=args.peak_tflops or tflops,
        memory_limit=limit,
    )


def output_of(step):
    """``step`` without the selection it also returns."""
    return lambda *operands: step(*operands)[0]


def compile_each(functions: dict, operands) -> tuple[dict, dict]:
    """Each jitted function compiled for ``operands``; ``(compiled, notes)``, a note (and no
    executable) for each that does not compile, e.g. no cuDNN kernel for a shape."""
    compiled, notes = {}, {}
    for name, f in functions.items():
        try:
            compiled[name] = jax.jit(f).lower(*operands).compile()
        except Exception as error:  # noqa: BLE001 - reported in the row
            notes[name] = f"does not compile: {first_line(error)}"
    return compiled, notes


def first_line(error: Exception) -> str:
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    return f"{type(error).__name__}: {lines[0][:160] if lines else ''}"


def guarded(run, n_visual: int, *args, info: dict) -> list[dict]:
    """``run(n_visual, *args, info)``'s rows, or one row saying why the case failed (out of
    memory at run time, ...), so one case cannot end the benchmark."""
    try:
        return run(n_visual, *args, info)
    except Exception as error:  # noqa: BLE001 - reported in the row
        note = f"failed: {first_line(error)}"
        print(f"  N={n_visual}: {note}", flush=True)
        return [
            dict(
                device=info["device"],
                platform=info["platform"],
                n_visual=n_visual,
                impl="-",
                note=note,
            )
        ]


def max_error(actual, expected) -> float:
    """Max |actual - expected| over the largest of 1 and max |expected| (over pytrees)."""
    worst = 0.0
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        worst = max(worst, np.abs(a - e).max() / max(1.0, np.abs(e).max()))
    return float(worst)


def normal(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


# ----------------------------------------------------------------------------------------------
# Decode.


def decode_bytes(
    query_meta, kv_meta, table, selection, route, num_kv_heads, head_dim, dtype, descriptor_bytes
) -> dict:
    """Bytes a decode step must read, and what xla and pallas fetch, from the actual selection."""
    kind = np.asarray(kv_meta.kind)
    unrouted = int(((kind == TokenKind.TEXT) | (kind == TokenKind.CONTEXT)).sum())
    row = 2 * head_dim * jnp.dtype(dtype).itemsize  # one K and one V row of one KV head
    count, _, length, _ = pallas_decode._selected_regions(table, selection, num_kv_heads, route)
    regions_dedup, routed_tokens = int(np.asarray(count).sum()), int(np.asarray(length).sum())
    region, valid = np.asarray(selection.region[:, 0]), np.asarray(selection.valid[:, 0])
    lengths = np.asarray(table.length)[0]
    num_heads = region.shape[1]
    step = 1 if route == "per_head" else num_heads // num_kv_heads
    selectors = range(0, num_heads, step)  # the heads whose selection xla reads
    xla_tokens = sum(int(lengths[region[0, h]][valid[0, h]].sum()) for h in selectors)
    xla_rows = sum(int(valid[0, h].sum()) for h in selectors) * table.capacity  # slices of m
    pallas_reads = {}
    for platform, compiler in (("tpu", "mosaic"), ("gpu", "triton")):
        window = pallas_decode.window(table.capacity, compiler, dtype)
        span = window.span
        pieces, _, _ = pallas_decode._unrouted_pieces(query_meta, kv_meta, unrouted, span)
        segments = num_kv_heads * int(np.asarray(pieces).sum()) + regions_dedup
        pallas_reads[platform] = row * window.rows * segments + descriptor_bytes
    return dict(
        unrouted_tokens=unrouted,
        regions_dedup=regions_dedup,
        routed_tokens_dedup=routed_tokens,
        routed_tokens_xla=xla_tokens,
        must_read=row * (num_kv_heads * unrouted + routed_tokens) + descriptor_bytes,
        xla_reads=row * (num_kv_heads * unrouted + xla_rows) + descriptor_bytes,
        pallas_reads=pallas_reads,
    )


def run_decode(n_visual: int, route: str, args, info: dict) -> list[dict]:
    num_heads, num_kv_heads, head_dim = args.heads
    layout = build_layout(
        [TextSegment(DECODE_TEXT), *visual_segments(n_visual), TextSegment(DECODE_TEXT)],
        REGION,
        NUM_CONTEXT,
    )
    length = layout.length
    slots = cache_slots(length)  # allocated as the decoder does; the tail is padding
    kv_meta, table = batch_layouts([layout], length=slots)
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(n_visual)
    key, value = (normal(rng, (1, slots, num_kv_heads, head_dim), dtype) for _ in range(2))
    query = normal(rng, (1, 1, num_heads, head_dim), dtype)
    descriptors = routing.region_descriptors(key, kv_meta, table.num_regions)
    query_meta = TokenMeta(
        *(
            jnp.asarray([[x]], jnp.int32)
            for x in (TokenKind.TEXT, -1, -1, int(kv_meta.position.max()) + 1)
        )
    )
    kind = np.asarray(kv_meta.kind)
    unrouted = int(((kind == TokenKind.TEXT) | (kind == TokenKind.CONTEXT)).sum())

    # Metadata, region table and descriptors are arguments (runtime data, as in a decode loop),
    # so that XLA cannot constant-fold what depends on them. K and V are the decoder's
    # head-major cache; cuDNN gets a length-major copy, its own layout.
    cache = dict(
        query_meta=query_meta,
        kv_meta=kv_meta,
        table=table,
        descriptors=descriptors,
        filled=jnp.int32(length),
        length_major=(key, value),
    )
    operands = (query, *(jnp.swapaxes(x, 1, 2) for x in (key, value)), cache)

    def gaze(implementation):
        bound = None if implementation == "reference" else unrouted
        return jax.jit(
            lambda q, k, v, c: gaze_attention(
                q,
                k,
                v,
                c["query_meta"],
                c["kv_meta"],
                c["table"],
                top_k=args.top_k,
                descriptors=c["descriptors"],
                routing=route,
                implementation=implementation,
                max_unrouted_tokens=bound,
                return_selection=True,
                heads_first=True,
            )
        )

    expected, selection = gaze("reference")(*operands)
    nbytes = decode_bytes(
        query_meta,
        kv_meta,
        table,
        selection,
        route,
        num_kv_heads,
        head_dim,
        dtype,
        descriptors.size * descriptors.dtype.itemsize,
    )
    dense_bytes = 2 * length * num_kv_heads * head_dim * dtype.itemsize
    interpret = info["platform"] == "cpu"
    outputs = {
        "dense": jax.jit(dense_decode),
        "xla": output_of(gaze("xla")),
        "pallas": output_of(gaze("pallas")),
    }
    if info["platform"] == "gpu":
        outputs["cudnn"] = jax.jit(cudnn_decode)
    compiled, notes = compile_each(outputs, operands)
    timed = [i for i in compiled if not (interpret and i == "pallas")]
    times = median_ms([compiled[i] for i in timed], operands, args.reps)
    times = dict(zip(timed, times, strict=True))
    errors = {i: max_error(compiled[i](*operands), expected) for i in compiled if i != "dense"}

    platform = "gpu" if info["platform"] == "gpu" else "tpu"
    base = dict(
        section="decode",
        **{k: info[k] for k in ("device", "platform")},
        n_visual=n_visual,
        cache_len=length,
        cache_slots=slots,
        routing=route,
        top_k=args.top_k,
        heads=list(args.heads),
        dtype=args.dtype,
        region_size=table.capacity,
        num_regions=table.num_regions,
        **{k: v for k, v in nbytes.items() if k != "pallas_reads"},
    )
    reads = dict(
        dense=dense_bytes,
        cudnn=dense_bytes,
        xla=nbytes["xla_reads"],
        pallas=nbytes["pallas_reads"][platform],
    )
    rows = [
        dict(
            base,
            impl=impl,
            floor_bytes=dense_bytes if impl in ("dense", "cudnn") else nbytes["must_read"],
            reads_bytes=reads[impl],
            median_ms=times.get(impl),
            error=errors.get(impl),
            note=notes.get(impl) or (INTERPRET if interpret and impl == "pallas" else ""),
        )
        for impl in outputs
    ]
    for r in rows:
        ms = r["median_ms"]
        r["gbps"] = r["floor_bytes"] / ms / 1e6 if ms else None
        r["floor_ms"] = r["floor_bytes"] / info["peak_gbps"] / 1e6 if info["peak_gbps"] else None
    return rows


# ----------------------------------------------------------------------------------------------
# Training.


def dense_train_attention(query, key, value, position):
    """Causal GQA attention with the full [b, kv_heads, g, q, kv] score matrix."""
    batch, length, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    q = query.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("bqkgd,blkd->bkgql", q, key, preferred_element_type=jnp.float32)
    causal = position[:, None, None, None, :] <= position[:, None, None, :, None]
    logits = jnp.where(causal, logits * head_dim**-0.5, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgql,blkd->bqkgd", probs, value, preferred_element_type=jnp.float32)
    return out.reshape(query.shape).astype(query.dtype)


def visible_pairs(meta, table, selection) -> tuple[int, int]:
    """``(dense, gaze)`` visible (query, head) → key pairs of one sample, summed over heads.

    Dense: causal over all tokens. Gaze (DESIGN.md §2): text sees earlier text and context plus
    its heads' selected regions; visual sees every earlier token; context sees its unit's visual
    tokens and its unit's context tokens up to itself.
    """
    kind, unit, position = (np.asarray(x)[0] for x in (meta.kind, meta.unit, meta.position))
    num_heads = selection.region.shape[2]
    valid = kind != TokenKind.PADDING
    pos = position[valid]
    earlier_all = np.searchsorted(np.sort(pos), pos, side="right")  # keys with position <= p
    dense = int(earlier_all.sum()) * num_heads
    unrouted_pos = np.sort(position[(kind == TokenKind.TEXT) | (kind == TokenKind.CONTEXT)])
    text = kind == TokenKind.TEXT
    text_unrouted = np.searchsorted(unrouted_pos, position[text], side="right").sum()
    lengths = np.asarray(table.length)[0]
    region, chosen = np.asarray(selection.region)[0], np.asarray(selection.valid)[0]
    routed = int(np.where(chosen, lengths[np.maximum(region, 0)], 0)[text].sum())
    visual = int(
        np.searchsorted(np.sort(pos), position[kind == TokenKind.VISUAL], side="right").sum()
    )
    context = 0
    for u in np.unique(unit[kind == TokenKind.CONTEXT]):
        own = unit == u
        n_visual = int((own & (kind == TokenKind.VISUAL)).sum())
        ctx = np.sort(position[own & (kind == TokenKind.CONTEXT)])
        context += int((n_visual + np.searchsorted(ctx, ctx, side="right")).sum())
    gaze = (int(text_unrouted) + visual + context) * num_heads + routed
    return dense, gaze


def memory(compiled) -> dict:
    stats = compiled.memory_analysis()
    if stats is None:
        return dict(peak_bytes=None, temp_bytes=None)
    peak = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return dict(peak_bytes=int(peak), temp_bytes=int(stats.temp_size_in_bytes))


def calibrate(args, dtype) -> float:
    """Attention FLOP/s of this device: dense forward + backward at 1024 tokens."""
    num_heads, num_kv_heads, head_dim = args.heads
    length = 1024
    rng = np.random.default_rng(0)
    q = normal(rng, (1, length, num_heads, head_dim), dtype)
    k, v = (normal(rng, (1, length, num_kv_heads, head_dim), dtype) for _ in range(2))
    position = jnp.arange(length, dtype=jnp.int32)[None]
    f = jax.jit(
        jax.grad(
            lambda q, k, v: dense_train_attention(q, k, v, position).sum(dtype=jnp.float32),
            (0, 1, 2),
        )
    )
    (ms,) = median_ms([f], (q, k, v), 3)
    return 4 * length * length * head_dim * num_heads * 2.5 / (ms / 1e3)


# Computed FLOPs relative to the dense rectangle (4·q·kv·d·h·2.5), for skipping only.
COST = {
    "dense": 1.0,
    "sdpa": 1.0,
    "cudnn": 1.0,
    "xla": 3.5 / 2.5,
    "pallas": 1.0,
    "pallas_interpret": 3.0,
}


def run_train(n_visual: int, args, rate: float, info: dict) -> list[dict]:
    num_heads, num_kv_heads, head_dim = args.heads
    text = args.train_text
    layout = build_layout(
        [TextSegment(TEXT_BEFORE), *visual_segments(n_visual), TextSegment(text - TEXT_BEFORE)],
        REGION,
        NUM_CONTEXT,
    )
    meta, table = batch_layouts([layout])
    length = layout.length
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(n_visual + 1)
    q, w = (normal(rng, (1, length, num_heads, head_dim), dtype) for _ in range(2))
    k, v = (normal(rng, (1, length, num_kv_heads, head_dim), dtype) for _ in range(2))
    interpret = info["platform"] == "cpu"

    # Floors from the actual selection (text queries only route).
    descriptors = routing.region_descriptors(k, meta, table.num_regions)
    selection = routing.select_regions(
        q, descriptors, routing.routable(meta, table), top_k=args.top_k, routing=args.train_routing
    )
    dense_pairs, gaze_pairs = visible_pairs(meta, table, selection)
    block = min(pallas_train.DEFAULT_BLOCK, 1 << (length - 1).bit_length())
    codes = pallas_train.tile_codes(meta, meta, selection.region, table.num_regions, block, block)
    tile_fraction = float((np.asarray(codes) != 0).mean())

    def loss(attend):  # metadata and table are arguments: no constant folding
        def f(q, k, v, w, meta, table):
            out = attend(q, k, v, meta, table)
            return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), out

        return jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))

    def gaze(implementation):
        return lambda q, k, v, meta, table: gaze_attention(
            q,
            k,
            v,
            meta,
            meta,
            table,
            top_k=args.top_k,
            routing=args.train_routing,
            implementation=implementation,
        )

    operands = (q, k, v, w, meta, table)
    impls = {
        "dense": lambda q, k, v, meta, table: dense_train_attention(q, k, v, meta.position),
        "sdpa": lambda q, k, v, *_: jax.nn.dot_product_attention(q, k, v, is_causal=True),
        "cudnn": lambda q, k, v, *_: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"
        ),
        "xla": gaze("xla"),
        "pallas": gaze("pallas"),
    }
    rectangle = 4 * length * length * head_dim * num_heads * 2.5
    base = dict(
        section="train",
        **{key: info[key] for key in ("device", "platform")},
        n_visual=n_visual,
        seq_len=length,
        text_queries=text,
        heads=list(args.heads),
        dtype=args.dtype,
        top_k=args.top_k,
        routing=args.train_routing,
        tiles_visited=tile_fraction,
    )
    rows, results = [], {}
    for impl in args.train_impls:
        dense = impl in ("dense", "sdpa", "cudnn")
        floor = 4 * head_dim * (dense_pairs if dense else gaze_pairs) * 2.5
        row = dict(
            base,
            impl=impl,
            floor_flops=floor,
            median_ms=None,
            peak_bytes=None,
            temp_bytes=None,
            error=None,
            note="",
        )
        rows.append(row)
        fn = loss(impls[impl])
        interpreted = impl == "pallas" and interpret
        if not interpreted:
            try:
                compiled = fn.lower(*operands).compile()
            except Exception as e:  # noqa: BLE001 - e.g. no cuDNN kernel for this shape/dtype
                row["note"] = f"skipped: does not compile ({type(e).__name__})"
                continue
            row.update(memory(compiled))
            if info["memory_limit"] and row["peak_bytes"] > info["memory_limit"]:
                row["note"] = (
                    f"skipped: needs {row['peak_bytes'] / 2**30:.1f} GiB > "
                    f"{info['memory_limit'] / 2**30:.1f} GiB"
                )
                continue
        estimate = rectangle * COST["pallas_interpret" if interpreted else impl] / rate
        if estimate > args.max_seconds:
            row["note"] = f"skipped: est. {estimate:.0f} s/call > --max-seconds {args.max_seconds}"
            continue
        try:
            if interpreted:
                (_, out), grads = fn(*operands)
                row["note"] = INTERPRET
            else:
                (ms,) = median_ms([compiled], operands, args.train_reps)
                (_, out), grads = compiled(*operands)
                row["median_ms"] = ms
        except Exception as error:  # noqa: BLE001 - e.g. out of memory at run time
            row["note"] = f"failed: {first_line(error)}"
            continue
        results[impl] = (out, grads)
    oracle = results.get("xla")
    for row in rows:
        ms = row["median_ms"]
        row["tflops"] = row["floor_flops"] / ms / 1e9 if ms else None
        row["floor_ms"] = (
            row["floor_flops"] / info["peak_tflops"] / 1e9 if info["peak_tflops"] else None
        )
        if row["impl"] == "pallas" and oracle is not None and "pallas" in results:
            row["error"] = max_error(results["pallas"], oracle)  # out, dq, dk, dv vs xla
    return rows


# ----------------------------------------------------------------------------------------------
# Output.


def fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


DECODE_COLUMNS = (
    "device",
    "n_visual",
    "routing",
    "impl",
    "floor_bytes",
    "reads_bytes",
    "median_ms",
    "gbps",
    "floor_ms",
    "error",
)
TRAIN_COLUMNS = (
    "device",
    "n_visual",
    "seq_len",
    "impl",
    "median_ms",
    "peak_bytes",
    "temp_bytes",
    "floor_flops",
    "tflops",
    "floor_ms",
    "error",
)


def print_decode(rows) -> None:
    print(
        f"{'decode':6} {'device':12} {'N':>6} {'routing':8} {'impl':7} {'must-read MiB':>13} "
        f"{'reads MiB':>9} {'ms':>8} {'GB/s':>7} {'floor ms':>8} {'max err':>8}  note"
    )
    for r in rows:
        r = {k: r.get(k) for k in DECODE_COLUMNS} | {"note": r["note"]}
        print(
            f"{'':6} {r['device']:12} {r['n_visual']:>6} {fmt(r['routing'], '8'):8} {r['impl']:7} "
            f"{fmt(mib(r['floor_bytes']), '13.2f'):>13} {fmt(mib(r['reads_bytes']), '9.2f'):>9} "
            f"{fmt(r['median_ms'], '8.2f'):>8} {fmt(r['gbps'], '7.1f'):>7} "
            f"{fmt(r['floor_ms'], '8.3f'):>8} {fmt(r['error'], '8.1e'):>8}  {r['note']}",
            flush=True,
        )


def mib(nbytes):
    return None if nbytes is None else nbytes / 2**20


def print_train(rows) -> None:
    print(
        f"{'train':6} {'device':12} {'N':>6} {'L':>6} {'impl':7} {'fwd+bwd ms':>10} "
        f"{'peak MiB':>9} {'temp MiB':>9} {'floor GFLOP':>11} {'TFLOP/s':>7} "
        f"{'floor ms':>8} {'max err':>8}  note"
    )
    for r in rows:
        r = {k: r.get(k) for k in TRAIN_COLUMNS} | {"note": r["note"]}
        gflop = None if r["floor_flops"] is None else r["floor_flops"] / 1e9
        print(
            f"{'':6} {r['device']:12} {r['n_visual']:>6} {fmt(r['seq_len'], '6'):>6} {r['impl']:7} "
            f"{fmt(r['median_ms'], '10.1f'):>10} {fmt(mib(r['peak_bytes']), '9.1f'):>9} "
            f"{fmt(mib(r['temp_bytes']), '9.1f'):>9} {fmt(gflop, '11.1f'):>11} "
            f"{fmt(r['tflops'], '7.3f'):>7} {fmt(r['floor_ms'], '8.2f'):>8} "
            f"{fmt(r['error'], '8.1e'):>8}  {r['note']}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[4608, 16384], help="decode visual tokens N"
    )
    parser.add_argument(
        "--train-sizes",
        type=int,
        nargs="+",
        default=None,
        help="training visual tokens (default --sizes; --quick: 576 1152)",
    )
    parser.add_argument(
        "--train-text",
        type=int,
        default=None,
        help=f"training text queries (default {TRAIN_TEXT}; --quick: 256)",
    )
    parser.add_argument(
        "--heads", type=int, nargs=3, default=list(HEADS), metavar=("HEADS", "KV_HEADS", "HEAD_DIM")
    )
    parser.add_argument(
        "--train-heads",
        type=int,
        nargs=3,
        default=None,
        metavar=("HEADS", "KV_HEADS", "HEAD_DIM"),
        help="training heads (default --heads; --quick: 8 2 128)",
    )
    parser.add_argument("--top-k", type=int, default=TOP_K)
    parser.add_argument("--routings", nargs="+", default=["per_head", "shared"])
    parser.add_argument("--train-routing", default="per_head")
    parser.add_argument(
        "--train-impls",
        nargs="+",
        default=None,
        help="dense sdpa cudnn xla pallas (default: sdpa and cudnn only off CPU, cudnn on GPU)",
    )
    parser.add_argument("--dtype", default=None, help="default float32 on CPU, else bfloat16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--train-reps", type=int, default=5)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=30.0,
        help="skip training cases estimated slower than this per call",
    )
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--peak-gbps", type=float, default=None)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="5 decode / 3 training reps; small training cases (CPU)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON records (default benchmarks/results/kernels_<platform>.json)",
    )
    args = parser.parse_args()
    info = device_info(args)
    cpu = info["platform"] == "cpu"
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    if args.quick:
        args.reps, args.train_reps = 5, 3
    args.train_sizes = args.train_sizes or ([576, 1152] if args.quick else args.sizes)
    args.train_text = args.train_text or (256 if args.quick else TRAIN_TEXT)
    train_heads = args.train_heads or ([8, 2, 128] if args.quick else args.heads)
    args.train_impls = args.train_impls or (
        ["dense", "xla", "pallas"]
        if cpu
        else ["dense", "sdpa", *(["cudnn"] if info["platform"] == "gpu" else []), "xla", "pallas"]
    )
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"kernels_{info['platform']}.json"
    )

    print(
        f"device: {info['device']}; dtype {args.dtype}; region {REGION}, |C| {NUM_CONTEXT} "
        f"per unit, K {args.top_k}; peak GB/s {info['peak_gbps']}, TFLOP/s "
        f"{info['peak_tflops']}" + (f"; Pallas in the interpreter ({INTERPRET})" if cpu else "")
    )
    records = []
    if not args.skip_decode:
        print(
            f"\ndecode step: heads {args.heads}, batch 1, {DECODE_TEXT} text + N visual + "
            f"{DECODE_TEXT} text cached; {args.reps} reps"
        )
        rows = []
        for n_visual in args.sizes:
            for route in args.routings:
                rows += guarded(run_decode, n_visual, route, args, info=info)
        print_decode(rows)
        records += rows
    if not args.skip_train:
        args.heads = train_heads
        rate = calibrate(args, jnp.dtype(args.dtype))
        print(
            f"\ntraining forward+backward: heads {train_heads}, {args.train_text} text queries,"
            f" routing {args.train_routing}; {args.train_reps} reps; calibrated dense rate "
            f"{rate / 1e9:.1f} GFLOP/s"
        )
        rows = []
        for n_visual in args.train_sizes:
            rows += guarded(run_train, n_visual, args, rate, info=info)
        print_train(rows)
        records += rows
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(records, f, indent=1)
    print(f"wrote {len(records)} records to {out}")


if __name__ == "__main__":
    main()

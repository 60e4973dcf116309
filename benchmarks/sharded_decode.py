"""The longest video that decodes on P devices with the KV cache split along its sequence, against
one device, at the same memory limit per device.

The model is a Qwen3-4B-shaped decoder (hidden 2560, 32 query / 8 KV heads × 128, MLP 9728, tied
151936-word embeddings) with ``--layers`` layers (default 2; Qwen3-4B has 36, which compile
slowly here), bfloat16 parameters and cache; video
frames of 24×24 = 576 tokens, 6×6 regions, 4 context tokens each, 32 text tokens before and 32
after the video and room for 64 answer tokens. Gaze decodes with K = 20 regions (the video
configs'); ``--attention dense`` gives the dense baseline over the same split cache.

Memory per device of one decode step comes from XLA's compiled memory analysis of the step that
``python -m gazejax.generate --mesh sequence=P`` runs (the decoder's cache path with the cache
donated, compiled for P simulated CPU devices, one shard's figures): ``argument + output −
alias + temp`` bytes, i.e. the replicated parameters, the cache's shard (keys, values,
descriptors, metadata), the logits and the step's temporaries. Nothing is allocated: the step
is compiled from abstract arrays. The bytes grow linearly with the frames, so two compiles give
the line, secant steps find where it meets the limit, and compiles at that count and one more
frame check it (fits, does not fit). On XLA:CPU the temporaries include float32 copies of the
bfloat16 weights (CPU dots run in float32; constant in the frames). The vision tower is not
counted (not needed after the prefill; So400m/16 adds 0.8 GiB bfloat16 per device); nor is the
prefill, which runs the whole prompt's forward once and is not what this measures.

    python benchmarks/sharded_decode.py                      # gaze, 4 GiB per device, P = 8
    python benchmarks/sharded_decode.py --attention gaze,dense --memory-gib 8 --layers 4

Prints a table and writes ``benchmarks/results/sharded_decode.json``. Runs on 8 simulated CPU
devices (the script sets ``XLA_FLAGS`` before importing jax).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

NUM_SHARDS = 8
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={NUM_SHARDS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from gazejax.gaze import TextSegment, VisualSegment, batch_layouts, build_layout  # noqa: E402
from gazejax.inference.sequence_parallel import shard_with_room  # noqa: E402
from gazejax.models.decoder import Decoder, DecoderConfig, KVCache  # noqa: E402
from gazejax.presets import QWEN3_4B  # noqa: E402
from gazejax.sharding import make_mesh, mesh_rules  # noqa: E402
from kernels.gaze_attention import TokenKind, TokenMeta  # noqa: E402

FRAME_SIDE, REGION, NUM_CONTEXT, TOP_K = 24, (6, 6, 1), 4, 20
TEXT_BEFORE, TEXT_AFTER, ANSWER_ROOM = 32, 32, 64
GIB = 2**30


def decoder_config(layers: int, attention: str) -> DecoderConfig:
    decoder = {k: v for k, v in QWEN3_4B.items() if k != "remat"}
    decoder.update(num_layers=layers, attention=attention, gaze_top_k=TOP_K)
    return DecoderConfig(**decoder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


def video_layout(frames: int, num_shards: int):
    """Cache length and region slots of a ``frames``-frame prompt with room for the answer,
    laid out for ``num_shards`` shards (``gazejax.inference.sequence_parallel``)."""
    segments = [
        TextSegment(TEXT_BEFORE),
        VisualSegment(FRAME_SIDE, FRAME_SIDE, frames),
        TextSegment(TEXT_AFTER),
    ]
    layout = build_layout(segments, REGION, NUM_CONTEXT)
    if num_shards > 1:
        layout = shard_with_room(layout, num_shards, ANSWER_ROOM)
        return layout, layout.length
    return layout, layout.length + ANSWER_ROOM


def placed(x: jax.ShapeDtypeStruct, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def step_bytes(config: DecoderConfig, frames: int, num_shards: int) -> dict:
    """Compiled memory of one decode step per device (see the module docstring)."""
    layout, max_len = video_layout(frames, num_shards)
    mesh = make_mesh((1, 1, 1, num_shards), jax.devices()[:num_shards])
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec(None, "sequence"))
    _, table = batch_layouts([layout])
    model = Decoder(config)
    params = jax.eval_shape(
        lambda: nn.unbox(
            Decoder(decoder_config(config.num_layers, "dense")).init(
                jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
            )
        )["params"]
    )
    cache = jax.eval_shape(lambda: KVCache.empty(config, 1, max_len, regions=table))
    cache = jax.tree.map(lambda x: placed(x, replicated), cache)  # metadata, region table
    layers = tuple(jax.tree.map(lambda x: placed(x, split), c) for c in cache.layers)
    cache = cache.replace(layers=layers)
    params = jax.tree.map(lambda x: placed(x, replicated), params)
    unrouted = TEXT_BEFORE + TEXT_AFTER + NUM_CONTEXT * frames + ANSWER_ROOM

    def step(params, cache):
        meta = TokenMeta(
            kind=jnp.full((1, 1), TokenKind.TEXT, jnp.int32),
            unit=jnp.full((1, 1), -1, jnp.int32),
            region=jnp.full((1, 1), -1, jnp.int32),
            position=jnp.full((1, 1), layout.position.max() + 1, jnp.int32),
        )
        return model.apply(
            {"params": params},
            jnp.zeros((1, 1), jnp.int32),
            token_meta=meta,
            cache=cache,
            max_unrouted_tokens=unrouted if config.attention == "gaze" else None,
        )

    start = time.perf_counter()
    with mesh_rules(mesh if num_shards > 1 else None):
        compiled = jax.jit(step, donate_argnums=1).lower(params, cache).compile()
    memory = compiled.memory_analysis()
    return {
        "frames": frames,
        "visual_tokens": frames * FRAME_SIDE * FRAME_SIDE,
        "cache_slots": max_len,
        "per_device_bytes": int(
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes
        ),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "cache_bytes_per_device": nbytes(cache.layers) // num_shards,
        "param_bytes": nbytes(params),
        "compile_s": round(time.perf_counter() - start, 1),
    }


def largest_video(config: DecoderConfig, num_shards: int, limit: int, probe: int) -> dict:
    """The most frames whose step fits ``limit`` bytes per device: secant steps on the
    (nearly linear) bytes per frame from a ``probe``-frame compile, then the boundary checked
    (that many frames fit, one more does not)."""
    measured = {}

    def bytes_at(frames: int) -> int:
        if frames not in measured:
            measured[frames] = step_bytes(config, frames, num_shards)
            row = measured[frames]
            print(
                f"  {config.attention} P={num_shards} frames={frames}: "
                f"{row['per_device_bytes'] / GIB:.3f} GiB ({row['compile_s']} s)",
                file=sys.stderr,
                flush=True,
            )
        return measured[frames]["per_device_bytes"]

    low, high = probe, 2 * probe
    for _ in range(6):  # secant: frames where the line through the last two points hits limit
        slope = (bytes_at(high) - bytes_at(low)) / (high - low)
        guess = max(1, int(high + (limit - bytes_at(high)) // slope))
        if guess == high:
            break
        low, high = high, guess
    frames = high
    while bytes_at(frames) > limit:
        frames -= 1
    while bytes_at(frames + 1) <= limit:
        frames += 1
    return {
        **measured[frames],
        "per_frame_bytes": slope,
        "next_frame_bytes": measured[frames + 1]["per_device_bytes"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-gib", type=float, default=4.0, help="limit per device")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--attention", default="gaze", help="gaze, dense or gaze,dense")
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "results" / "sharded_decode.json")
    )
    args = parser.parse_args(argv)
    if jax.device_count() < NUM_SHARDS:
        print(
            f"needs {NUM_SHARDS} devices (XLA_FLAGS was set before this script?)", file=sys.stderr
        )
        return 1
    limit = int(args.memory_gib * GIB)
    rows = []
    for attention in args.attention.split(","):
        config = decoder_config(args.layers, attention)
        for num_shards in (1, NUM_SHARDS):
            row = largest_video(config, num_shards, limit, probe=2 * num_shards)
            rows.append({"attention": attention, "devices": num_shards, **row})
    header = (
        f"{'attention':>9} {'devices':>7} {'frames':>7} {'visual tokens':>13} "
        f"{'GiB/device':>10} {'cache GiB/device':>16} {'params GiB':>10} {'MiB/frame':>9}"
    )
    print(
        f"largest video at {args.memory_gib:g} GiB per device, {args.layers}-layer Qwen3-4B decoder"
    )
    print(header)
    for r in rows:
        print(
            f"{r['attention']:>9} {r['devices']:>7} {r['frames']:>7} {r['visual_tokens']:>13} "
            f"{r['per_device_bytes'] / GIB:>10.2f} {r['cache_bytes_per_device'] / GIB:>16.2f} "
            f"{r['param_bytes'] / GIB:>10.2f} {r['per_frame_bytes'] / 2**20:>9.2f}"
        )
    for attention in {r["attention"] for r in rows}:
        one, many = (r["frames"] for r in rows if r["attention"] == attention)
        print(f"{attention}: {many / one:.2f}x the frames on {NUM_SHARDS} devices")
    result = {
        "memory_limit_bytes": limit,
        "layers": args.layers,
        "method": "compiled memory analysis of one decode step per device: argument + output "
        "- alias + temp bytes; largest frame count below the limit (frame + 1 above it)",
        "rows": rows,
    }
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

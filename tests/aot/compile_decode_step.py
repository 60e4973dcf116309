"""Compiles the decoder's one-token decode step for a GPU or a TPU, on a CPU, and checks that it
reads the KV cache in place.

A decode step writes one key and value per layer into the donated cache and attends over it.
Gaze attention pays off only if nothing else touches the whole cache: a transpose of a layer's
keys to another layout before the kernel (as the Pallas decode once had) reads and writes the
cache, several times the bytes the kernel itself reads. The step (a 2-layer Qwen3-4B-headed
decoder, 32 query / 8 KV heads × 128, bfloat16, K = 20, a cache of 8 frames of 24×24 tokens and
2048 text slots, 6688 in all, allocated as ``decoder.cache_slots`` rounds it: 6784) is compiled
for the target deviceless (PLATFORM.md), with the Pallas kernels compiled for it, and its
compiled ``memory_analysis()`` must hold no temporary buffer as large as one layer's keys: a
cache-sized copy needs one, whatever fusion hides it.
It caught, for an H100: the Pallas decode's transposed K and V (28.3 MiB of temporaries before
the kernel read the head-major cache; 8.0 MiB now, cuBLAS's workspace) and the dense step's
matmuls padding a 6688-slot cache to 6784 (13.9 MiB; hence ``cache_slots``). For TPU v5e the
old transpose left no cache-sized temporary (its compiler laid the donated cache out to suit),
so there it guards against a regression only.

    JAX_PLATFORMS=cpu python tests/aot/compile_decode_step.py --target sm90
    JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python tests/aot/compile_decode_step.py --target v5e

Run by ``make compile-kernels``; exit status 1 when a variant fails to compile or copies.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
from compile_kernels import TARGETS, target_mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gazejax.gaze.regions import TextSegment, VisualSegment, batch_layouts, build_layout
from gazejax.models.decoder import Decoder, DecoderConfig, KVCache, cache_slots
from kernels.gaze_attention import TokenKind

CONFIG = DecoderConfig(
    vocab_size=4096,
    hidden_size=1024,
    intermediate_size=2048,
    num_layers=2,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    dtype=jnp.bfloat16,
    gaze_top_k=20,
)
SAMPLE = (TextSegment(32), VisualSegment(24, 24, 8), TextSegment(2016))
VARIANTS = {  # name -> attention, routing, implementation
    "dense": ("dense", "per_head", "xla"),
    "gaze pallas per_head": ("gaze", "per_head", "pallas"),
    "gaze pallas shared": ("gaze", "shared", "pallas"),
    "gaze xla per_head": ("gaze", "per_head", "xla"),
}


def compile_step(mesh, attention: str, routing: str, implementation: str):
    """The compiled step ``(params, cache, token, meta) -> (logits, cache)``, cache donated."""
    config = dataclasses.replace(
        CONFIG, attention=attention, gaze_routing=routing, gaze_implementation=implementation
    )
    layout = build_layout(SAMPLE, (6, 6), 4)
    meta, regions = batch_layouts([layout], length=cache_slots(layout.length))
    length = meta.kind.shape[1]
    unrouted = int(((meta.kind == TokenKind.TEXT) | (meta.kind == TokenKind.CONTEXT)).sum())
    model, dense = Decoder(config), Decoder(dataclasses.replace(config, attention="dense"))
    params = jax.eval_shape(  # gaze adds no parameters
        lambda: dense.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    )
    cache = jax.eval_shape(
        lambda: KVCache.empty(config, 1, length, regions if attention == "gaze" else None)
    )
    last = jax.tree.map(lambda x: x[:, -1:], meta)

    def step(params, cache, token, last):
        return model.apply(
            {"params": params},
            token,
            token_meta=last,
            cache=cache,
            max_unrouted_tokens=unrouted if attention == "gaze" else None,
        )

    replicated = NamedSharding(mesh, P())
    args = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        (params, cache, jax.ShapeDtypeStruct((1, 1), jnp.int32), last),
    )
    with jax.set_mesh(mesh):  # the kernels compile for the mesh's platform
        compiled = jax.jit(step, donate_argnums=1).trace(*args).lower().compile()
    return compiled, cache.layers[0].keys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=TARGETS, required=True)
    args = parser.parse_args()
    if os.environ.get("JAX_PLATFORMS") != "cpu":
        parser.error("run with JAX_PLATFORMS=cpu (the compiler runs without a device)")
    mesh = target_mesh(args.target)
    failed = 0
    for name, variant in VARIANTS.items():
        start = time.perf_counter()
        try:
            compiled, keys = compile_step(mesh, *variant)
            layer_keys = keys.size * keys.dtype.itemsize
            temp = compiled.memory_analysis().temp_size_in_bytes
            status = f"compiled, temporaries {temp / 2**20:.1f} MiB"
            status += f" (one layer's keys {layer_keys / 2**20:.1f} MiB)"
            if temp >= layer_keys:
                status, failed = f"FAILED: cache-sized temporaries: {status}", 1
        except Exception as error:  # noqa: BLE001 - a compiler error is the result to report
            status, failed = f"FAILED: {type(error).__name__}: {str(error)[:500]}", 1
        seconds = time.perf_counter() - start
        print(f"{args.target:5s} decode step {name:22s} {seconds:5.1f} s  {status}", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())

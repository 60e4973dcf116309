"""Compiles every Pallas gaze kernel variant for real accelerators, on a CPU, without one.

Interpret mode (the test suite) checks semantics only; a device's compiler checks the rest:
Triton's verifier and cubin emission for GPUs, Mosaic's layout passes and VMEM allocation for
TPUs. Both compilers run here without a device (PLATFORM.md):

- ``--target sm90``: XLA's GPU compiler for an H100 (compute capability 9.0, 132 SMs), from a
  venv with ``jax[cuda12-local]`` (no NVIDIA wheels, no driver);
- ``--target v5e`` / ``v6e`` / ``v5p``: libtpu's compiler for one chip, from a venv with
  ``jax[tpu]``.

Each variant (kernel × routing × dtype × size) is traced with abstract arguments placed on the
target's topology, lowered and compiled with ``interpret=False``; the kernels then run the
device code path they run on that device. The decode kernel reads the decoder's head-major
cache ``[batch, kv_heads, len, head_dim]``, as a decode step hands it over. The ``test`` size is
the unit tests' layout with realistic heads, ``head_dim_64`` the same with 64-wide heads, and
``realistic`` Qwen3-4B attention (32 query / 8 KV heads, head_dim 128) over 4608 visual + 2048
text tokens, so a VMEM overrun fails here. Variants known not to compile yet
are listed in :data:`KNOWN_FAILURES` with the reason: they must still fail (a variant that starts
to compile fails the run until it is taken off the list), every other one must compile.

    JAX_PLATFORMS=cpu python tests/aot/compile_kernels.py --target sm90
    JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python tests/aot/compile_kernels.py --target v5e

``make compile-kernels`` builds both venvs and runs every target (CI runs it). Exit status 1
when a variant compiles or fails against expectation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gazejax.gaze.regions import TextSegment, VisualSegment, batch_layouts, build_layout
from kernels.gaze_attention import region_descriptors, routable, select_regions
from kernels.gaze_attention.pallas_decode import attend_selected_pallas_decode
from kernels.gaze_attention.pallas_train import attend_selected_pallas_train

# An H100 SXM as XLA's GPU compiler sees it (GpuTargetConfig text proto; openxla/xla PR 25919).
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3350000000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 85000000000
  shared_memory_per_block_optin: 232448 cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
runtime_version { major: 12 minor: 8 patch: 0 }
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
TPU_TOPOLOGIES = {"v5e": "v5e:1x1", "v6e": "v6e:1x1", "v5p": "v5p:1x1x1"}
TARGETS = ("sm90", *TPU_TOPOLOGIES)
KERNELS = ("decode", "train_forward", "train_backward")
ROUTINGS = ("per_head", "shared")
DTYPES = ("float32", "bfloat16")

# (target, kernel, dtype, size) -> why it does not compile yet; ``*`` matches anything. Empty:
# every variant compiles (the training kernel's TPU E2003 and VMEM overrun and the decode
# kernel's unaligned DMAs were the last entries).
KNOWN_FAILURES: dict[tuple[str, str, str, str], str] = {}


@dataclasses.dataclass(frozen=True)
class Size:
    """Attention shape and sample layout of one size class."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    segments: tuple
    top_k: int


SIZES = {
    # The unit tests' layouts (text, two images, text) with realistic heads.
    "test": Size(8, 2, 128, (TextSegment(5), VisualSegment(12, 12, 2), TextSegment(40)), 2),
    # 64-wide heads (Qwen2.5-0.5B's): the TPU decode once needed a multiple of 128 lanes.
    "head_dim_64": Size(14, 2, 64, (TextSegment(5), VisualSegment(12, 12, 2), TextSegment(40)), 2),
    # Qwen3-4B attention; 8 frames of 24×24 = 4608 visual tokens, 2048 text tokens.
    "realistic": Size(
        32, 8, 128, (TextSegment(32), VisualSegment(24, 24, 8), TextSegment(2016)), 20
    ),
}
REGION_SIZE, CONTEXT_TOKENS = (6, 6), 4


def target_mesh(target: str) -> jax.sharding.Mesh:
    """A one-device mesh of the target's (deviceless) topology."""
    if target == "sm90":
        topology = topologies.get_topology_desc(
            platform="cuda", topology="1x1x1", target_config=H100
        )
    else:
        topology = topologies.get_topology_desc(
            topology_name=TPU_TOPOLOGIES[target], platform="tpu", chips_per_host_bounds=(1, 1, 1)
        )
    return topologies.make_mesh(topology, (1,), ("x",))


def variant_function(kernel: str, routing: str, size: Size, backend: str):
    """``f(query, key, value)`` of one variant, with its layout closed over (static metadata),
    and the query length it takes."""
    layout = build_layout(list(size.segments), REGION_SIZE, CONTEXT_TOKENS, pad_regions=True)
    meta, table = batch_layouts([layout])
    decode = kernel == "decode"
    query_meta = jax.tree.map(lambda x: x[:, -1:], meta) if decode else meta

    def select(query, key):
        length_major = jnp.swapaxes(key, 1, 2) if decode else key
        descriptors = region_descriptors(length_major, meta, table.num_regions)
        allowed = routable(query_meta, table)
        return select_regions(query, descriptors, allowed, top_k=size.top_k, routing=routing)

    def forward(query, key, value):
        selection = select(query, key)
        args = (query, key, value, query_meta, meta, table, selection)
        scale = size.head_dim**-0.5
        if decode:
            return attend_selected_pallas_decode(
                *args,
                routing=routing,
                scale=scale,
                max_unrouted_tokens=2048 + 64,
                heads_first=True,
                backend=backend,
                interpret=False,
            )
        return attend_selected_pallas_train(
            *args, routing=routing, scale=scale, backend=backend, interpret=False
        )

    def backward(query, key, value):
        def loss(q, k, v):
            out, lse = forward(q, k, v)
            finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
            return out.astype(jnp.float32).sum() + finite.sum()

        return jax.grad(loss, argnums=(0, 1, 2))(query, key, value)

    q_len = 1 if decode else meta.kind.shape[1]
    return (backward if kernel == "train_backward" else forward), q_len, meta.kind.shape[1]


def compile_variant(target, mesh, kernel, routing, dtype, size_name) -> tuple[bool, str, float]:
    """Compiles one variant; ``(compiled, first line of the error, seconds)``."""
    size = SIZES[size_name]
    backend = "triton" if target == "sm90" else "tpu"
    f, q_len, kv_len = variant_function(kernel, routing, size, backend)
    replicated = NamedSharding(mesh, P())

    def spec(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=replicated)

    cache = (1, size.num_kv_heads, kv_len) if kernel == "decode" else (1, kv_len, size.num_kv_heads)
    args = (
        spec(1, q_len, size.num_heads, size.head_dim),
        spec(*cache, size.head_dim),
        spec(*cache, size.head_dim),
    )
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):  # Pallas TPU lowering asks the device kind of the mesh
            jax.jit(f).trace(*args).lower().compile()
    except Exception as error:  # noqa: BLE001 - every compiler error is a result to report
        return False, error_summary(error), time.perf_counter() - start
    return True, "", time.perf_counter() - start


def error_summary(error: Exception) -> str:
    """The error's type and its first informative lines (not the links to error docs)."""
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    lines = [x for x in lines if not x.startswith(("See https", "---", "Traceback"))]
    return f"{type(error).__name__}: {' | '.join(lines[:3])[:500]}"


def known_failure(*variant: str) -> str | None:
    """Why ``(target, kernel, dtype, size)`` is expected not to compile, or None."""
    for key, reason in KNOWN_FAILURES.items():
        if all(k in ("*", v) for k, v in zip(key, variant, strict=True)):
            return reason
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=TARGETS, required=True)
    parser.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=tuple(SIZES))
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=KERNELS)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    if os.environ.get("JAX_PLATFORMS") != "cpu":
        parser.error("run with JAX_PLATFORMS=cpu (the compiler runs without a device)")
    mesh = target_mesh(args.target)
    print(f"target {args.target}: {mesh.devices.flat[0].device_kind}", flush=True)
    rows, unexpected = [], 0
    for size in args.sizes:
        # The other sizes: bfloat16 (what a model trains and decodes in), per-head routing
        # (shared routing changes the selection, not the kernels' code or blocks).
        dtypes, routings = (DTYPES, ROUTINGS) if size == "test" else (("bfloat16",), ("per_head",))
        for kernel in args.kernels:
            for routing in routings:
                for dtype in dtypes:
                    ok, error, seconds = compile_variant(
                        args.target, mesh, kernel, routing, dtype, size
                    )
                    reason = known_failure(args.target, kernel, dtype, size)
                    if ok:
                        status = "XPASS (take it off KNOWN_FAILURES)" if reason else "compiled"
                    else:
                        status = f"known failure: {reason}" if reason else "FAILED"
                    unexpected += ok == bool(reason)
                    name = f"{kernel} {routing} {dtype} {size}"
                    print(f"{args.target:5s} {name:45s} {seconds:6.1f} s  {status}", flush=True)
                    if error:
                        print(f"      {error}", flush=True)
                    rows.append(
                        dict(
                            target=args.target,
                            kernel=kernel,
                            routing=routing,
                            dtype=dtype,
                            size=size,
                            compiled=ok,
                            expected_failure=reason,
                            error=error,
                            seconds=round(seconds, 2),
                        )
                    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{len(rows)} variants, {unexpected} against expectation", flush=True)
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compiles a sharded gaze training step with the Pallas kernels for a 4-chip TPU, on a CPU.

The step (loss and gradients of a tiny gaze decoder, ``gaze_implementation="pallas"``) is traced
with abstract, sharded arguments on a deviceless ``v5e:2x2`` topology under ``jax.set_mesh`` and
the default logical axis rules, as ``gazejax.train`` runs it, and compiled by libtpu's compiler:
the kernels compile with Mosaic inside ``jax.shard_map`` (``kernels/gaze_attention/
sharded_train.py``), and the partitioner's collectives (the context-parallel K/V all-gather and
its reduce-scatter) are those of a real 4-chip slice. One mesh splits heads and sequence
(tensor 2 × sequence 2), one batch and sequence (data 2 × sequence 2).

    JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python tests/aot/compile_sharded_step.py

Run by ``make compile-kernels``; exit status 1 when a mesh fails to compile.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gazejax.gaze.regions import TextSegment, VisualSegment, batch_layouts, build_layout
from gazejax.losses import cross_entropy
from gazejax.models.decoder import Decoder, DecoderConfig
from gazejax.sharding import DEFAULT_LOGICAL_AXIS_RULES, make_mesh

TOPOLOGY = "v5e:2x2"
MESHES = ((1, 1, 2, 2), (2, 1, 1, 2))  # (data, fsdp, tensor, sequence)
CONFIG = DecoderConfig(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=512,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=128,
    dtype=jnp.bfloat16,
    attention="gaze",
    gaze_top_k=2,
    gaze_implementation="pallas",
)
SAMPLE = (TextSegment(6), VisualSegment(12, 12), TextSegment(40))  # 194 slots with context
BATCH, LENGTH = 2, 256


def step_arguments(mesh):
    """The step's abstract arguments, sharded by the logical rules: params, embeddings,
    token metadata, region table, targets."""
    meta, regions = batch_layouts([build_layout(SAMPLE, (6, 6), 4)] * BATCH, length=LENGTH)
    embeds = jax.ShapeDtypeStruct((BATCH, LENGTH, CONFIG.hidden_size), jnp.float32)
    targets = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)

    def init(embeds):  # gaze adds no parameters
        dense = Decoder(dataclasses.replace(CONFIG, attention="dense"))
        return dense.init(jax.random.key(0), None, inputs_embeds=embeds, token_meta=meta)

    abstract = jax.eval_shape(init, embeds)["params"]
    rules = DEFAULT_LOGICAL_AXIS_RULES
    param_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.value.shape, x.value.dtype, sharding=s),
        abstract,
        param_shardings,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    per_sample = NamedSharding(mesh, P(("data", "fsdp")))
    inputs = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=per_sample),
        (embeds, meta, regions, targets),
    )
    return (params, *inputs)


def loss(params, embeds, meta, regions, targets):
    logits = Decoder(CONFIG).apply(
        {"params": params}, None, inputs_embeds=embeds, token_meta=meta, regions=regions
    )
    return cross_entropy(logits, targets)[0]


def main() -> int:
    if os.environ.get("JAX_PLATFORMS") != "cpu":
        sys.exit("run with JAX_PLATFORMS=cpu (the compiler runs without a device)")
    devices = topologies.get_topology_desc(topology_name=TOPOLOGY, platform="tpu").devices
    failed = 0
    for shape in MESHES:
        mesh = make_mesh(shape, devices)
        start = time.perf_counter()
        try:
            with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES):
                lowered = jax.jit(jax.value_and_grad(loss)).trace(*step_arguments(mesh)).lower()
                hlo = lowered.compile().as_text()
            kernels = hlo.count("tpu_custom_call")
            status = f"compiled, {kernels} Mosaic kernel calls"
            if kernels < 3:  # forward, dQ, dK/dV
                status, failed = f"FAILED: {kernels} Mosaic kernel calls, expected >= 3", 1
        except Exception as error:  # noqa: BLE001 - a compiler error is the result to report
            status, failed = f"FAILED: {type(error).__name__}: {str(error)[:500]}", 1
        seconds = time.perf_counter() - start
        print(f"{TOPOLOGY} mesh {shape}: {seconds:5.1f} s  {status}", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())

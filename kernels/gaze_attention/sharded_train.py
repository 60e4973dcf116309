"""Gaze attention of many queries (training, prefill) under ``jax.shard_map`` (DESIGN.md §4).

XLA cannot partition a Pallas custom call: left to the SPMD partitioner, a kernel runs on
whole, replicated operands. :func:`sharded_gaze_attention` runs the op (routing and any
implementation) per device instead, on that device's slice:

- **batch** over ``batch_axes`` (e.g. ``("data", "fsdp")``): samples are independent;
- **heads** over ``head_axes`` (e.g. ``"tensor"``): query heads and KV heads are split by the
  same axes, so a device holds ``num_kv_heads / T`` KV heads and their whole GQA groups (query
  heads are KV-head-major: head ``i`` reads KV head ``i // group``). Routing stays local:
  per-head scores and the ``"shared"`` sum over a group need only the device's heads, and the
  descriptors ``[b, R, h_kv, d]`` are split the same way;
- **sequence** over ``sequence_axis`` (context parallelism): queries stay split along the
  sequence, and each layer all-gathers the device's batch/head slice of K and V (and reads the
  replicated token metadata, region table and descriptors). Each device then routes its own
  queries over the whole sequence, and the kernel attends its query slice to the gathered
  keys; the gradient of the all-gather is a reduce-scatter of dK and dV.

Why an all-gather of K/V and not a ring. A gaze query's keys are data-dependent and sparse: text
sees text and context everywhere before it plus K selected regions anywhere earlier, so which
remote KV blocks a shard needs is known only after routing, and a region (or a unit's context
tokens) may sit on any shard. A ring would still pass every KV block through every device
(``(P-1)/P`` of the slice, the bytes of the all-gather) in ``P - 1`` dependent steps, each a
kernel launch on a fraction of the tiles plus a log-sum-exp merge, and would split the kernel's
tile plan (which skips unselected tiles globally) into ``P`` plans. The all-gather is one
collective per layer (overlappable with the previous layer's MLP by XLA's scheduler), the
kernel and its tile skipping run unchanged on ``[N/P queries, N keys]``, and the extra memory
is the layer's gathered K/V slice ``2·(b/B)·N·(h_kv/T)·d`` (a residual of the kernel's backward
unless the layer is rematerialised), of the order of one layer's local activations at training
lengths (thousands of tokens). A ring pays off when that slice itself does not fit, at far
longer sequences than gaze trains on.

Communication per layer and device, ``P`` the sequence shards, ``B``/``T`` the batch/head
shards: forward, an all-gather receiving ``2·(P-1)/P·(b/B)·N·(h_kv/T)·d·itemsize`` bytes (K and
V); backward, a reduce-scatter of dK and dV of the same size. The full KV (all samples, all
heads) and the full activations are never gathered.

Dimensions that do not divide are not split: a batch not divisible by the batch axes' size, or
KV heads not divisible by the head axes' size (rather than split a GQA group), is replicated over
those axes (every device of them computes the same heads: correct, and the rest of the layer
stays sharded); a query or KV length not divisible by the sequence axis' size (a decode step,
``q_len = 1``) is not sequence-split; when nothing splits, the op runs as it is (outside
``shard_map``, placed by XLA's partitioner). Replication is correct under autodiff: with
``check_vma=False`` the transpose divides the output cotangent by, and sums the input
cotangents over, the axes an operand is replicated on.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.sharding import PartitionSpec

from kernels.gaze_attention.dispatch import gaze_attention
from kernels.gaze_attention.metadata import RegionTable, TokenMeta
from kernels.gaze_attention.routing import Selection

__all__ = ["sharded_gaze_attention"]

MeshAxes = str | tuple[str, ...] | None


def sharded_gaze_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    query_meta: TokenMeta,
    kv_meta: TokenMeta,
    regions: RegionTable,
    *,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
    batch_axes: MeshAxes,
    head_axes: MeshAxes,
    sequence_axis: MeshAxes,
    descriptors: jax.Array | None = None,
    **options,
) -> tuple[jax.Array, Selection]:
    """:func:`~kernels.gaze_attention.gaze_attention` split over ``mesh``; see the module
    docstring. Same arguments and result (with the selection) as ``gaze_attention``.

    Args:
      query: [batch, q_len, num_heads, head_dim].
      key, value: [batch, kv_len, num_kv_heads, head_dim].
      query_meta: [batch, q_len]; kv_meta: [batch, kv_len] metadata.
      regions: [batch, num_regions] region table (global slots of ``key``).
      mesh: the device mesh (concrete or abstract).
      batch_axes, head_axes, sequence_axis: mesh axis (or axes, or None) splitting the batch,
        the heads (query and KV heads alike) and the sequence (queries; K/V all-gathered).
      descriptors: [batch, num_regions, num_kv_heads, head_dim] or None (then each device
        computes its heads' from the gathered keys).
      **options: ``gaze_attention``'s keywords (``top_k``, ``routing``, ``scale``,
        ``implementation``, ``max_unrouted_tokens``).

    Returns:
      ``(out [batch, q_len, num_heads, head_dim] in query.dtype, Selection [batch, q_len,
      num_heads, top_k])``, split like ``query``.
    """
    batch, q_len = query.shape[:2]
    kv_len, num_kv_heads = key.shape[1:3]

    def dividing(axes: MeshAxes, *sizes: int) -> tuple[str, ...] | None:
        """The axes of ``axes`` larger than 1 if their mesh size divides every size, else None
        (replicate)."""
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        for name in names:
            if name not in mesh.shape:
                raise ValueError(f"mesh axis {name!r} is not an axis of {dict(mesh.shape)}")
        names = tuple(name for name in names if mesh.shape[name] > 1)
        shards = math.prod(mesh.shape[name] for name in names)
        return names if names and all(size % shards == 0 for size in sizes) else None

    b = dividing(batch_axes, batch)
    h = dividing(head_axes, num_kv_heads)
    s = dividing(sequence_axis, q_len, kv_len)
    args = [query, key, value, query_meta, kv_meta, regions]
    if b is None and h is None and s is None:  # nothing to split: the op as it is
        return _attend_local(*args, descriptors, sequence_axis=None, **options)
    tokens, per_sample = PartitionSpec(b, s, h, None), PartitionSpec(b)
    specs = [tokens, tokens, tokens, PartitionSpec(b, s), per_sample, per_sample]
    if descriptors is not None:
        args.append(descriptors)
        specs.append(PartitionSpec(b, None, h, None))
    body = functools.partial(_attend_local, sequence_axis=s, **options)
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(specs),
        out_specs=(tokens, tokens),
        # Interpret-mode Pallas needs it (PLATFORM.md); see the module docstring for autodiff.
        check_vma=False,
    )(*args)


def _attend_local(
    query, key, value, query_meta, kv_meta, regions, descriptors=None, *, sequence_axis, **options
):
    """The body under ``shard_map``: one device's queries over its slice's whole sequence."""
    if sequence_axis is not None:
        key, value = (
            jax.lax.all_gather(x, sequence_axis, axis=1, tiled=True) for x in (key, value)
        )
    return gaze_attention(
        query,
        key,
        value,
        query_meta,
        kv_meta,
        regions,
        descriptors=descriptors,
        return_selection=True,
        **options,
    )

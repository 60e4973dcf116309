"""Gaze attention on the ambient mesh: the decoder's entry to the sharded op.

Under ``jax.set_mesh(mesh)`` and Flax's ``nn.logical_axis_rules`` (as ``gazejax.train`` runs),
:func:`gaze_attention_on_mesh` runs the op under ``jax.shard_map``
(:func:`kernels.gaze_attention.sharded_train.sharded_gaze_attention`) over the mesh axes the
rules map the logical axes ``batch``, ``heads`` and ``length`` to (by default ``data`` and
``fsdp``; ``tensor``; ``sequence``), so a Pallas kernel runs on each device's slice instead of
being replicated by XLA's partitioner, and the other implementations keep their memory bound
per device. Without a mesh, on a one-device mesh, or inside a ``shard_map`` already, it is
:func:`kernels.gaze_attention.gaze_attention`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kernels.gaze_attention import Selection, gaze_attention
from kernels.gaze_attention.sharded_train import sharded_gaze_attention


def gaze_attention_on_mesh(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *args,
    return_selection: bool = False,
    heads_first: bool = False,
    **options,
) -> jax.Array | tuple[jax.Array, Selection]:
    """``gaze_attention(query, key, value, *args, return_selection=..., heads_first=...,
    **options)``, split over the mesh.

    Takes ``gaze_attention``'s arguments (``query [batch, q_len, num_heads, head_dim]``, ...)
    and returns what it returns (``out [batch, q_len, num_heads, head_dim]``, and with
    ``return_selection`` the :class:`Selection`). A head-major ``key`` and ``value``
    (``heads_first``) are split over the mesh length-major.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return gaze_attention(
            query,
            key,
            value,
            *args,
            return_selection=return_selection,
            heads_first=heads_first,
            **options,
        )
    if heads_first:
        key, value = (jnp.swapaxes(x, 1, 2) for x in (key, value))
    batch, length, heads = nn.logical_to_mesh_axes(("batch", "length", "heads"))
    out, selection = sharded_gaze_attention(
        query,
        key,
        value,
        *args,
        mesh=mesh,
        batch_axes=batch,
        head_axes=heads,
        sequence_axis=length,
        **options,
    )
    return (out, selection) if return_selection else out

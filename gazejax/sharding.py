"""Logical axis names and their default mapping onto the mesh axes.

Every parameter and main activation in gazejax carries logical axis names (below). Only the
rules map them to the mesh axes ``data``, ``fsdp``, ``tensor`` and ``sequence``; a config may
replace the rules without touching model code (MaxText style).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# Logical axis names used by the models.
#   activations: batch, length, embed, heads, kv_heads, head_dim, mlp, vocab
#   parameters:  embed, heads, kv_heads, head_dim, mlp, vocab, layers, patch_*, channels
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("cache_length", "sequence"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("patch_height", None),
    ("patch_width", None),
    ("channels", None),
    ("norm", None),
)


def make_mesh(
    shape: Sequence[int], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """A mesh with axes ``(data, fsdp, tensor, sequence)`` of ``shape``, all ``AxisType.Auto``.

    ``AxisType.Auto`` matters: with jax's default (Explicit) axes Flax Linen's logical
    constraints fail (see PLATFORM.md).
    """
    if len(shape) != len(MESH_AXES):
        raise ValueError(
            f"mesh shape {tuple(shape)} must have {len(MESH_AXES)} entries {MESH_AXES}"
        )
    devices = list(devices if devices is not None else jax.devices())
    size = int(np.prod(shape))
    if size != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {size} devices, found {len(devices)}")
    return jax.make_mesh(
        tuple(shape),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )

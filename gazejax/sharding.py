"""Logical axis names and their default mapping onto the mesh axes.

Every parameter and main activation in gazejax carries logical axis names (below). Only the
rules map them to the mesh axes ``data``, ``fsdp``, ``tensor`` and ``sequence``; a config may
replace the rules without touching model code (MaxText style).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import flax.linen as nn
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
    ("cache_rows", ("data", "fsdp", "tensor")),  # a KV cache's batch · kv_heads
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


def parse_mesh(text: str, device_count: int | None = None) -> tuple[int, ...]:
    """The mesh shape ``(data, fsdp, tensor, sequence)`` of a ``--mesh`` flag.

    ``text`` is ``AXIS=SIZE[,AXIS=SIZE...]`` over :data:`MESH_AXES` (e.g. ``sequence=8``,
    ``data=2,sequence=4``); unnamed axes have size 1, and one size may be ``-1``: the devices
    left (``device_count``, default all), as in a config's ``mesh.shape``.
    """
    sizes = dict.fromkeys(MESH_AXES, 1)
    for item in text.split(","):
        name, _, size = item.strip().partition("=")
        if name not in sizes or not size.strip().lstrip("-").isdigit():
            raise ValueError(
                f"--mesh {text!r}: expected AXIS=SIZE[,AXIS=SIZE...] with AXIS of {MESH_AXES}"
            )
        sizes[name] = int(size)
    shape = [sizes[a] for a in MESH_AXES]
    if shape.count(-1) > 1 or any(s < 1 and s != -1 for s in shape):
        raise ValueError(f"--mesh {text!r}: sizes must be >= 1 (one may be -1)")
    if -1 in shape:
        device_count = jax.device_count() if device_count is None else device_count
        shape[shape.index(-1)] = device_count // -math.prod(shape)
    return tuple(shape)


@contextlib.contextmanager
def mesh_rules(
    mesh: jax.sharding.Mesh | None,
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = DEFAULT_LOGICAL_AXIS_RULES,
) -> Iterator[None]:
    """``jax.set_mesh(mesh)`` with the logical axis ``rules``; nothing when ``mesh`` is None."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield

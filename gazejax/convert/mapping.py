"""Data-driven parameter mapping between gazejax Flax trees and flat checkpoint tensors.

A model family describes its conversion as a list of :class:`Rule`s: the parameter's path in
the Flax tree, the checkpoint key(s) it comes from and two small transform hooks. Loading and
saving are then generic: every Flax parameter must be produced by exactly one rule, every
tensor must have the shape the model expects, and every checkpoint key must be used or
explicitly ignored. Nothing is ever loaded partially or silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath
from safetensors import SafetensorError, safe_open

Array = np.ndarray
Transform = Callable[[Array], Array]


def identity(x: Array) -> Array:
    return x


def transpose(x: Array) -> Array:
    """Swap a 2-D matrix: torch ``Linear.weight [out, in]`` <-> Flax ``Dense.kernel [in, out]``."""
    return np.ascontiguousarray(x.T)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One Flax parameter and the checkpoint tensor(s) it is made of.

    Attributes:
      path: the parameter's path in the Flax ``params`` tree, e.g.
        ``("layers_0", "mlp", "up_proj", "kernel")``.
      keys: checkpoint keys. One key maps one tensor; several keys (one per layer) are stacked
        along a new leading axis, as for blocks under ``nn.scan``.
      to_flax: applied to each checkpoint tensor before stacking.
      to_ckpt: the inverse of ``to_flax``, applied to each unstacked slice on export.
    """

    path: tuple[str, ...]
    keys: tuple[str, ...]
    to_flax: Transform = identity
    to_ckpt: Transform = identity


def rule(
    path: str,
    keys: str | Sequence[str],
    to_flax: Transform = identity,
    to_ckpt: Transform = identity,
) -> Rule:
    """Builds a :class:`Rule` from a ``/``-separated Flax path and one key or a list of keys."""
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    return Rule(tuple(path.split("/")), keys, to_flax, to_ckpt)


class ConversionError(ValueError):
    """A checkpoint that cannot be read or does not match the model: an unreadable file, a
    missing config key, or a missing, misshapen or unexpected tensor (the message names it)."""


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in the file ``path`` (local or cloud).

    Raises:
      FileNotFoundError: no such file.
      ConversionError: naming the file, when it is not valid JSON (e.g. cut short).
    """
    try:
        return json.loads(epath.Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from error


def open_safetensors(path: str):
    """``safe_open(path)`` for numpy; raises ConversionError naming the file when its header
    is bad or its data is cut short."""
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as error:
        raise ConversionError(f"{path} is not a valid safetensors file: {error}") from error


class TensorSource:
    """Lazy, per-tensor reader of a folder of safetensors files.

    Handles a single ``model.safetensors`` and the sharded form with
    ``model.safetensors.index.json``. Tensors are read one at a time, on request. ``rename``
    maps each stored key to the key the rules ask for (writers of one architecture differ in
    their prefixes); :meth:`keys` and :meth:`get` speak the renamed keys.
    """

    def __init__(self, folder: str | os.PathLike, rename: Callable[[str], str] = identity):
        self.folder = os.fspath(folder)
        index_path = os.path.join(self.folder, "model.safetensors.index.json")
        single_path = os.path.join(self.folder, "model.safetensors")
        if os.path.exists(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index_path} has no 'weight_map' object")
            stored = {k: os.path.join(self.folder, v) for k, v in weight_map.items()}
        elif os.path.exists(single_path):
            with open_safetensors(single_path) as f:
                stored = dict.fromkeys(f.keys(), single_path)  # noqa: SIM118
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {self.folder}"
            )
        self._stored = {rename(k): (file, k) for k, file in stored.items()}
        if len(self._stored) != len(stored):
            raise ConversionError(f"checkpoint {self.folder} stores a tensor twice under two names")

    def keys(self) -> set[str]:
        return set(self._stored)

    def get(self, key: str) -> Array:
        if key not in self._stored:
            raise ConversionError(f"checkpoint {self.folder} has no tensor {key!r}")
        file, stored_key = self._stored[key]
        with open_safetensors(file) as f:
            return f.get_tensor(stored_key)


def flatten(tree: Mapping) -> dict[tuple[str, ...], object]:
    """``{"a": {"b": x}}`` -> ``{("a", "b"): x}``."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            for sub, leaf in flatten(value).items():
                flat[(name, *sub)] = leaf
        else:
            flat[(name,)] = value
    return flat


def unflatten(flat: Mapping[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return tree


def load_params(
    rules: Iterable[Rule],
    source: TensorSource | Mapping[str, Array],
    expected: Mapping,
    dtype: np.dtype | type = np.float32,
    ignore: str | None = None,
) -> dict:
    """Builds a Flax ``params`` tree from checkpoint tensors.

    Args:
      rules: the model family's mapping.
      source: a :class:`TensorSource` or a plain ``{key: array}`` dict.
      expected: a tree of arrays or ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape`` of the
        model's init, unboxed) giving the shape of every parameter.
      dtype: dtype of the returned parameters.
      ignore: regex of checkpoint keys that may be present without being used.

    Raises:
      ConversionError: naming the tensor, if a key is missing, a shape differs, a Flax parameter
        has no rule, or the checkpoint has keys that no rule uses and ``ignore`` does not match.
    """
    rules = list(rules)
    expected_flat = {p: tuple(v.shape) for p, v in flatten(expected).items()}
    get = source.get if isinstance(source, TensorSource) else _dict_getter(source)
    available = source.keys() if isinstance(source, TensorSource) else set(source)

    ruled = {r.path for r in rules}
    unruled = sorted("/".join(p) for p in expected_flat if p not in ruled)
    if unruled:
        raise ConversionError(f"no conversion rule for parameters: {unruled}")

    used: set[str] = set()
    flat = {}
    for r in rules:
        if r.path not in expected_flat:
            raise ConversionError(f"rule for unknown parameter {'/'.join(r.path)!r}")
        slices = []
        for key in r.keys:
            if key not in available:
                raise ConversionError(f"checkpoint is missing tensor {key!r}")
            slices.append(np.asarray(r.to_flax(get(key))))
            used.add(key)
        value = slices[0] if len(slices) == 1 else np.stack(slices)
        want = expected_flat[r.path]
        if value.shape != want:
            raise ConversionError(
                f"tensor {r.keys[0] if len(r.keys) == 1 else list(r.keys)!r} has shape "
                f"{value.shape} after conversion, but parameter {'/'.join(r.path)!r} needs {want}"
            )
        flat[r.path] = value.astype(dtype)

    unused = sorted(k for k in available - used if not (ignore and re.search(ignore, k)))
    if unused:
        raise ConversionError(f"checkpoint tensors not used by the model: {unused}")
    return unflatten(flat)


def export_tensors(
    rules: Iterable[Rule], params: Mapping, dtype: np.dtype | type
) -> dict[str, Array]:
    """The inverse of :func:`load_params`: ``{checkpoint key: array}`` in ``dtype``."""
    flat = {p: np.asarray(v) for p, v in flatten(params).items()}
    out = {}
    for r in rules:
        value = flat[r.path]
        slices = [value] if len(r.keys) == 1 else list(value)
        for key, piece in zip(r.keys, slices, strict=True):
            out[key] = np.ascontiguousarray(r.to_ckpt(piece)).astype(dtype)
    return out


def _dict_getter(tensors: Mapping[str, Array]) -> Callable[[str], Array]:
    def get(key: str) -> Array:
        return np.asarray(tensors[key])

    return get

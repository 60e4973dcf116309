"""big_vision ViT ``.npz`` checkpoints <-> :class:`VisionTransformer` params.

big_vision saves a Flax tree flattened to ``/``-joined keys: ``embedding/kernel``,
``pos_embedding [1, N, width]``, ``Transformer/encoderblock_{i}/...`` (or, from a scanned model,
``Transformer/encoderblock/...`` with a leading layer axis), ``Transformer/encoder_norm/...`` and
``MAPHead_0/...``. A SigLIP two-tower file keeps the image tower under ``params/img/``; its text
tower is not read. Attention kernels are already ``[width, heads, head_dim]``.
"""

from __future__ import annotations

import os
import re
import zipfile

import numpy as np

from gazejax.convert.hf import abstract_params
from gazejax.convert.mapping import ConversionError, Rule, export_tensors, load_params, rule
from gazejax.convert.siglip import FAMILY, layer_rules
from gazejax.models.vit import VisionTransformer, ViTConfig

_TWO_TOWER_PREFIX = "params/img/"
_SCANNED_BLOCK = "Transformer/encoderblock/"
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.*)$")


def _module(path: str, key: str, leaves: tuple[str, str] = ("kernel", "bias")) -> list[Rule]:
    """Rules for a module whose leaves are named alike in both trees."""
    return [rule(f"{path}/{leaf}", f"{key}/{leaf}") for leaf in leaves]


def _norm(path: str, key: str) -> list[Rule]:
    return _module(path, key, ("scale", "bias"))


def _mlp(path: str, key: str) -> list[Rule]:
    return [*_module(f"{path}/fc1", f"{key}/Dense_0"), *_module(f"{path}/fc2", f"{key}/Dense_1")]


def rules(config: ViTConfig) -> list[Rule]:
    """The parameter table between a model with ``config`` and a plain (un-scanned) tree."""
    attn = "MultiHeadDotProductAttention_0"
    block = [
        *_norm("norm1", "LayerNorm_0"),
        *(
            r
            for name in ("query", "key", "value", "out")
            for r in _module(f"attn/{name}", f"{attn}/{name}")
        ),
        *_norm("norm2", "LayerNorm_1"),
        *_mlp("mlp", "MlpBlock_0"),
    ]
    table = [
        *_module("embedding", "embedding"),
        rule("pos_embedding", "pos_embedding", lambda a: a[0], lambda a: a[None]),
        *_norm("norm", "Transformer/encoder_norm"),
        *layer_rules(config, block, lambda i: f"Transformer/encoderblock_{i}/"),
    ]
    if config.pool == "map":
        head_attn = f"MAPHead_0/{attn}"
        table += [
            rule("head/probe", "MAPHead_0/probe"),
            *(
                rule(
                    f"head/in_proj_{leaf}",
                    [f"{head_attn}/{qkv}/{leaf}" for qkv in ("query", "key", "value")],
                )
                for leaf in ("kernel", "bias")
            ),
            *_module("head/out", f"{head_attn}/out"),
            *_norm("head/norm", "MAPHead_0/LayerNorm_0"),
            *_mlp("head/mlp", "MAPHead_0/MlpBlock_0"),
        ]
    return table


def _unscan(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``Transformer/encoderblock/X [depth, ...]`` -> ``Transformer/encoderblock_{i}/X``."""
    out = {}
    for key, value in tensors.items():
        if key.startswith(_SCANNED_BLOCK):
            rest = key[len(_SCANNED_BLOCK) :]
            out.update({f"Transformer/encoderblock_{i}/{rest}": v for i, v in enumerate(value)})
        else:
            out[key] = value
    return out


def _scan(tensors: dict[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """The inverse of :func:`_unscan`."""
    blocks = {k: m.group(2) for k in tensors if (m := _BLOCK.match(k))}
    out = {k: v for k, v in tensors.items() if k not in blocks}
    for leaf in sorted(set(blocks.values())):
        out[_SCANNED_BLOCK + leaf] = np.stack(
            [tensors[f"Transformer/encoderblock_{i}/{leaf}"] for i in range(depth)]
        )
    return out


def load_big_vision_npz(path: str | os.PathLike, config: ViTConfig) -> dict:
    """Reads a big_vision ViT (or SigLIP two-tower image tower) ``.npz`` as float32 params of
    ``VisionTransformer(config)``; scanned and un-scanned files load into either model.

    Raises:
      ConversionError: naming the file, if it is not a readable ``.npz`` (e.g. cut short), or
        the tensor, if one is missing, misshapen or unused.
    """
    try:
        with np.load(path) as npz:
            prefix = _TWO_TOWER_PREFIX if any(k.startswith(_TWO_TOWER_PREFIX) for k in npz) else ""
            tensors = {k[len(prefix) :]: npz[k] for k in npz if k.startswith(prefix)}
    except (zipfile.BadZipFile, EOFError, ValueError) as error:
        raise ConversionError(f"{path} is not a readable .npz file: {error}") from error
    expected = abstract_params(VisionTransformer(config), FAMILY)
    return load_params(rules(config), _unscan(tensors), expected)


def save_big_vision_npz(params: dict, config: ViTConfig, path: str | os.PathLike) -> None:
    """Writes ``params`` as a plain big_vision ViT ``.npz`` (float32), in the scanned layout
    when ``config.scan``."""
    tensors = export_tensors(rules(config), params, np.float32)
    np.savez(path, **(_scan(tensors, config.depth) if config.scan else tensors))

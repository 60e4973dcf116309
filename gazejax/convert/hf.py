"""``load_hf`` / ``save_hf``: local Hugging Face checkpoint folders <-> (module, params).

The folders are local (safetensors maps its files into memory): a ``gs://`` folder is refused,
naming it; copy it first (``gcloud storage cp -r``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from safetensors.numpy import save_file

from gazejax.convert import llava, qwen, siglip
from gazejax.convert.family import Family
from gazejax.convert.mapping import (
    ConversionError,
    TensorSource,
    export_tensors,
    load_params,
    read_json,
)
from gazejax.paths import is_local

FAMILIES: tuple[Family, ...] = (qwen.FAMILY, siglip.FAMILY, llava.FAMILY)


def family_for_model_type(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise ConversionError(f"unsupported model_type {model_type!r}; supported: {supported}")


def family_for_model(model: nn.Module) -> Family:
    for family in FAMILIES:
        if isinstance(model, family.module_type):
            return family
    raise ConversionError(f"no checkpoint family for module type {type(model).__name__}")


def read_hf_config(path: str | os.PathLike) -> dict:
    """The ``config.json`` of the Hugging Face folder ``path``.

    Raises:
      FileNotFoundError, ConversionError: naming the file (missing, not JSON, no model_type).
    """
    config_path = os.path.join(_local(path), "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} does not exist")
    config = read_json(config_path)
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConversionError(f"{config_path} has no 'model_type'")
    return config


def _local(path: str | os.PathLike) -> str:
    """``path`` as a string, when it is a local folder.

    Raises:
      ConversionError: a cloud path (``gs://...``).
    """
    if not is_local(path):
        raise ConversionError(
            f"{path}: Hugging Face folders are read and written on a local disk (safetensors "
            "maps files into memory); copy it there, e.g. with gcloud storage cp -r"
        )
    return os.fspath(path)


def carried_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``hf_config`` its family carries through conversions (``Family.carried``)."""
    family = family_for_model_type(hf_config["model_type"])
    return {key: hf_config[key] for key in family.carried if key in hf_config}


def build_model(hf_config: dict[str, Any], source: str) -> tuple[nn.Module, Family]:
    """The module a Hugging Face style config describes, and its family; errors name
    ``source``, the file the config came from.

    Raises:
      ConversionError: an unsupported ``model_type`` or a missing config key.
    """
    try:
        family = family_for_model_type(hf_config["model_type"])
        return family.build(hf_config), family
    except KeyError as error:
        raise ConversionError(f"{source} has no {error.args[0]!r}") from error
    except ConversionError as error:
        raise ConversionError(f"{source}: {error}") from error


def abstract_params(model: nn.Module, family: Family) -> dict:
    """Shapes of ``model``'s parameters, without allocating them."""
    inputs = family.example_inputs(model)
    variables = jax.eval_shape(model.init, jax.random.key(0), *inputs)
    return nn.unbox(variables["params"])


def load_hf(path: str | os.PathLike, **overrides) -> tuple[nn.Module, dict]:
    """Loads a local Hugging Face checkpoint folder as ``(module, params)``.

    ``params`` are float32 numpy arrays in a nested dict; use them as
    ``module.apply({"params": params}, ...)``. Tensors are read lazily one by one.
    ``overrides`` replace fields of the module's config that do not change the checkpoint's
    meaning, e.g. ``dtype=jnp.bfloat16``, ``remat=True`` or, for the ViT, ``scan=True``.

    Raises:
      FileNotFoundError: no ``config.json`` or no safetensors in ``path``.
      ConversionError: an unreadable ``config.json`` or safetensors file, an unsupported
        ``model_type``, a missing config key, or a missing / misshapen / unexpected tensor
        (the message names the file or the tensor).
    """
    hf_config = read_hf_config(path)
    model, family = build_model(hf_config, os.path.join(os.fspath(path), "config.json"))
    if overrides:
        model = model.clone(config=dataclasses.replace(model.config, **overrides))
    params = load_params(
        family.rules(model, hf_config),
        TensorSource(path, family.rename),
        abstract_params(model, family),
        ignore=family.ignore(hf_config),
    )
    return model, params


def save_hf(
    model: nn.Module,
    params: dict,
    path: str | os.PathLike,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
    config: dict | None = None,
) -> None:
    """Writes ``config.json`` and safetensors that ``transformers`` loads.

    Args:
      model, params: a gazejax module and its ``params`` tree.
      path: output folder (created).
      dtype: tensor dtype on disk, ``"float32"`` or ``"bfloat16"``.
      max_shard_bytes: if set, split the tensors into several files of at most this size and
        write ``model.safetensors.index.json``.
      config: entries added to ``config.json``, e.g. a multimodal model's
        ``{"image_token_index": i}`` (which the module does not know).

    Raises:
      ConversionError: a model its family cannot express, or a ``config.json`` entry that
        must be given in ``config`` and is not.
    """
    family = family_for_model(model)
    np_dtype = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(jax.numpy.bfloat16)
    hf_config = {**family.hf_config(model), **(config or {}), "dtype": dtype}
    missing = sorted(k for k, v in hf_config.items() if v is None)
    if missing:
        raise ConversionError(f"config.json needs {missing}: pass save_hf(..., config={{...}})")
    tensors = export_tensors(family.rules(model, hf_config), params, np_dtype)
    path = _local(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    metadata = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata=metadata)
        return
    shards: list[dict] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": weight_map,
    }
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)

"""gazejax checkpoints of converted models: ``model.json`` + an orbax ``params`` tree (a local
or cloud folder).

``model.json`` holds the family name and the model's Hugging Face style config dict, so the same
builder that reads HF folders rebuilds the module; parameters are written by orbax, atomically
(temporary directory, then rename).
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from gazejax.convert.hf import abstract_params, build_model, family_for_model
from gazejax.convert.mapping import ConversionError, read_json
from gazejax.paths import as_path


def save_gazejax(
    model: nn.Module, params: dict, path: str | os.PathLike, config: dict | None = None
) -> None:
    """Writes ``path/model.json`` and ``path/params`` (orbax); ``config``: entries added to the
    stored config (see :func:`~gazejax.convert.hf.carried_config`)."""
    path = as_path(path)
    family = family_for_model(model)
    path.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "params", jax.tree.map(jax.numpy.asarray, params))
    checkpointer.wait_until_finished()
    stored = {**family.hf_config(model), **(config or {})}
    (path / "model.json").write_text(
        json.dumps({"family": family.name, "config": stored}, indent=2)
    )


def read_model_config(path: str | os.PathLike) -> dict:
    """The Hugging Face style config stored in ``path/model.json``.

    Raises:
      FileNotFoundError: no ``model.json``.
      ConversionError: a ``model.json`` that is not JSON or has no config object (naming it).
    """
    meta_path = as_path(path) / "model.json"
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ConversionError(f"{meta_path} has no 'config' object")
    return meta["config"]


def load_gazejax(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Reads a folder written by :func:`save_gazejax`; returns ``(module, params)``.

    Raises:
      FileNotFoundError: no ``model.json``.
      ConversionError: a ``model.json`` that is not JSON or lacks a config key (naming it).
    """
    path = as_path(path)
    model, family = build_model(read_model_config(path), str(path / "model.json"))
    abstract = abstract_params(model, family)
    params = ocp.StandardCheckpointer().restore(path / "params", abstract)
    return model, params

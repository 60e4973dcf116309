"""Initialises parts of the multimodal model from converted checkpoints (``config.init_from``).

``init_from.vision`` and ``init_from.decoder`` name a local Hugging Face folder (``config.json``
+ safetensors) or a gazejax folder (``model.json`` + orbax params, from
``python -m gazejax.convert``). The checkpoint must have exactly the shapes the config builds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np

from gazejax.convert import ConversionError, load_hf
from gazejax.convert.mapping import flatten
from gazejax.convert.native import load_gazejax
from gazejax.models.mllm import MultimodalConfig


def load_part(path: str, overrides: Mapping) -> dict:
    """The ``params`` of a checkpoint folder (HF or gazejax), with module ``overrides``."""
    if os.path.exists(os.path.join(path, "model.json")):
        _, params = load_gazejax(path)
        return params
    _, params = load_hf(path, **overrides)
    return params


def init_from_checkpoints(
    params: dict, init_from: Mapping[str, str], model_config: MultimodalConfig
) -> dict:
    """``params`` with its ``vision`` and / or ``decoder`` subtrees replaced by checkpoints.

    Raises:
      ConversionError: naming the checkpoint and every parameter whose shape differs from the
        model's (e.g. a config built for another model size).
    """
    params = dict(params)
    overrides = {"vision": {"scan": model_config.vit.scan}, "decoder": {}}
    for part in ("vision", "decoder"):
        path = init_from.get(part, "")
        if not path:
            continue
        loaded = load_part(path, overrides[part])
        want = {k: tuple(v.shape) for k, v in flatten(params[part]).items()}
        got = {k: tuple(np.shape(v)) for k, v in flatten(loaded).items()}
        if want != got:
            problems = sorted(
                f"{'/'.join(k)}: checkpoint {got.get(k)} vs model {want.get(k)}"
                for k in set(want) | set(got)
                if want.get(k) != got.get(k)
            )
            raise ConversionError(f"init_from.{part}={path} does not fit the model: {problems}")
        params[part] = jax.tree.map(
            lambda new, old: np.asarray(new, dtype=old.dtype), loaded, params[part]
        )
    return params

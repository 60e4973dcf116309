"""Restoring a training workdir for inference: its model config, parameters and tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import tokenizers

from gazejax.checkpointing import Checkpointer
from gazejax.data.template import DEFAULT_SYSTEM_PROMPT
from gazejax.data.vocab import load_tokenizer
from gazejax.models.from_config import multimodal_config
from gazejax.models.mllm import MultimodalConfig


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A trained model ready to generate.

    Attributes:
      config: the model's :class:`MultimodalConfig`.
      params: its parameters.
      tokenizer: the training tokenizer (the built-in one for synthetic data).
      system_prompt: the training system prompt.
      max_frames: frames sampled from a video (the training data's setting).
      step: the restored training step.
    """

    config: MultimodalConfig
    params: dict
    tokenizer: tokenizers.Tokenizer
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_frames: int = 8
    step: int | None = None


def load_checkpoint(workdir: str | os.PathLike, step: int | None = None) -> Checkpoint:
    """Restores the parameters of a training workdir (``config.json`` + ``checkpoints/``).

    Args:
      workdir: the directory given to ``python -m gazejax.train --workdir``.
      step: the checkpoint step; default the latest.

    Raises:
      FileNotFoundError: no ``config.json`` or no checkpoint (naming the path).
    """
    workdir = os.path.abspath(os.fspath(workdir))
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: no config.json (not a training workdir?)")
    with open(config_path) as f:
        config = json.load(f)
    directory = os.path.join(workdir, "checkpoints")
    checkpointer = (
        Checkpointer(workdir, every_steps=1, max_to_keep=1) if os.path.isdir(directory) else None
    )
    steps = checkpointer.all_steps() if checkpointer else []
    if step is None and steps:
        step = steps[-1]
    if step not in steps:
        wanted = "any step" if step is None else f"step {step}"
        raise FileNotFoundError(f"{directory}: no checkpoint of {wanted} (have {steps})")
    state = checkpointer.restore_as_saved(step)
    checkpointer.close()
    params = jax.tree.map(jnp.asarray, state["params"])
    data = config.get("data", {})
    synthetic = data.get("name", "synthetic") == "synthetic"
    if synthetic:
        max_frames = data.get("synthetic", {}).get("video_frames", 8)
    else:
        max_frames = data.get("jsonl", {}).get("max_frames", 8)
    return Checkpoint(
        config=multimodal_config(config["model"]),
        params=params,
        tokenizer=load_tokenizer(None if synthetic else data["tokenizer"]),
        system_prompt=data.get("system_prompt", DEFAULT_SYSTEM_PROMPT),
        max_frames=int(max_frames),
        step=step,
    )


def with_attention(config: MultimodalConfig, attention: str) -> MultimodalConfig:
    """``config`` with ``decoder.attention`` replaced (same parameters; validated)."""
    decoder = dataclasses.replace(config.decoder, attention=attention)
    return dataclasses.replace(config, decoder=decoder)

"""Checkpoints for inference: a training workdir, or a Hugging Face LLaVA folder (imported, or
exported from a workdir by :func:`export_checkpoint`), restored as config, parameters and
tokenizer.

An exported folder is what ``transformers`` loads as ``LlavaForConditionalGeneration`` (dense
attention: ``config.json``, ``model.safetensors``, ``tokenizer.json``) plus the gaze parts in
side files that transformers ignores:

- ``gazejax.json``: ``{"format": "gazejax-export/1", "step": int, "config": {...}}``, the
  training config (a workdir's ``config.json``: its ``model`` section holds the gaze config,
  ``model.attention``, ``model.gaze.*``, ``model.num_context_tokens``, ``model.region_size``;
  its ``data`` section the system prompt and frame count);
- ``gazejax.safetensors``: ``context_tokens`` float32 ``[num_context_tokens, hidden]`` (absent
  when the model has none).

Loading such a folder rebuilds the training model from ``gazejax.json`` (the HF config must
describe the same architecture) and restores every parameter bit for bit. A folder without
``gazejax.json`` (an imported LLaVA checkpoint) is a dense model without context tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from etils import epath
from safetensors.numpy import load, save

from gazejax.checkpointing import Checkpointer
from gazejax.convert import ConversionError, load_hf, save_hf
from gazejax.data.template import DEFAULT_SYSTEM_PROMPT
from gazejax.data.vocab import IMAGE_TOKEN, load_tokenizer
from gazejax.init_from import load_mllm
from gazejax.models.from_config import multimodal_config
from gazejax.models.mllm import MultimodalConfig, MultimodalModel
from gazejax.paths import as_path

EXPORT_FORMAT = "gazejax-export/1"
SIDE_CONFIG = "gazejax.json"
SIDE_TENSORS = "gazejax.safetensors"


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
      run_config: the training config (a workdir's ``config.json``); empty for an imported
        Hugging Face folder.
    """

    config: MultimodalConfig
    params: dict
    tokenizer: tokenizers.Tokenizer
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_frames: int = 8
    step: int | None = None
    run_config: dict = dataclasses.field(default_factory=dict)


def load_checkpoint(path: str | os.PathLike, step: int | None = None) -> Checkpoint:
    """Restores a training workdir (``config.json`` + ``checkpoints/``) or a Hugging Face LLaVA
    folder (``config.json`` with ``model_type`` ``llava``; see the module doc).

    Args:
      path: the directory given to ``python -m gazejax.train --workdir``, or an HF folder.
      step: the workdir's checkpoint step; default the latest. An HF folder holds one step.

    Raises:
      FileNotFoundError: no ``config.json``, no checkpoint or no tokenizer (naming the path).
      ConversionError: an HF folder that does not load (naming the file or tensor).
    """
    path = as_path(path)  # local or cloud (gs://)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path}: no config.json (not a training workdir or Hugging Face folder?)"
        )
    config = json.loads(config_path.read_text())
    if "model_type" in config:
        if step is not None:
            raise ValueError(f"{path} is a Hugging Face folder of one step: drop the step")
        return _load_hf_folder(path)
    directory = path / "checkpoints"
    checkpointer = Checkpointer(path, every_steps=1, max_to_keep=1) if directory.is_dir() else None
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
    return _checkpoint(
        multimodal_config(config["model"]),
        params,
        load_tokenizer(None if synthetic else data["tokenizer"]),
        config,
        step,
    )


def _checkpoint(
    config: MultimodalConfig,
    params: dict,
    tokenizer: tokenizers.Tokenizer,
    run_config: dict,
    step: int | None,
) -> Checkpoint:
    """A :class:`Checkpoint`, with the system prompt and frame count of ``run_config``."""
    data = run_config.get("data", {})
    if data.get("name", "synthetic") == "synthetic":
        max_frames = data.get("synthetic", {}).get("video_frames", 8)
    else:
        max_frames = data.get("jsonl", {}).get("max_frames", 8)
    return Checkpoint(
        config=config,
        params=params,
        tokenizer=tokenizer,
        system_prompt=data.get("system_prompt", DEFAULT_SYSTEM_PROMPT),
        max_frames=int(max_frames),
        step=step,
        run_config=run_config,
    )


def _load_hf_folder(path: epath.Path) -> Checkpoint:
    """A Hugging Face LLaVA folder, with the gaze parts of its side files when present."""
    tokenizer_path = path / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path} does not exist (a tokenizer is needed)")
    tokenizer = load_tokenizer(tokenizer_path)
    side_path = path / SIDE_CONFIG
    if not side_path.is_file():
        model, params = load_hf(path)
        return _checkpoint(model.config, jax.tree.map(jnp.asarray, params), tokenizer, {}, None)
    side = json.loads(side_path.read_text())
    if side.get("format") != EXPORT_FORMAT:
        raise ConversionError(f"{side_path}: format {side.get('format')!r} is not {EXPORT_FORMAT}")
    config = multimodal_config(side["config"]["model"])
    params = load_mllm(path, config)
    if config.num_context_tokens:
        tensors = load((path / SIDE_TENSORS).read_bytes())
        params["context_tokens"] = tensors["context_tokens"]
    params = jax.tree.map(jnp.asarray, params)
    return _checkpoint(config, params, tokenizer, side["config"], side.get("step"))


def export_checkpoint(
    checkpoint: Checkpoint, path: str | os.PathLike, dtype: str = "float32"
) -> None:
    """Writes ``checkpoint`` as a Hugging Face LLaVA folder with gaze side files (module doc).

    ``dtype="float32"`` keeps every parameter bit for bit.

    Raises:
      ConversionError: a model ``LlavaForConditionalGeneration`` cannot express (token
        compression, a ViT output after its final norm), or a tokenizer without ``<image>``.
    """
    path = as_path(path)
    image_token = checkpoint.tokenizer.token_to_id(IMAGE_TOKEN)
    if image_token is None:
        raise ConversionError(f"the checkpoint's tokenizer has no {IMAGE_TOKEN!r} token")
    dense = MultimodalModel(dataclasses.replace(checkpoint.config, num_context_tokens=0))
    params = {k: v for k, v in checkpoint.params.items() if k != "context_tokens"}
    save_hf(dense, params, path, dtype=dtype, config={"image_token_index": image_token})
    (path / "tokenizer.json").write_text(checkpoint.tokenizer.to_str(pretty=True))
    if checkpoint.config.num_context_tokens:
        context = np.asarray(checkpoint.params["context_tokens"])
        (path / SIDE_TENSORS).write_bytes(save({"context_tokens": context}))
    if not checkpoint.run_config:  # an imported model: config.json says it all
        return
    side = {"format": EXPORT_FORMAT, "step": checkpoint.step, "config": checkpoint.run_config}
    (path / SIDE_CONFIG).write_text(json.dumps(side, indent=2, sort_keys=True))


def with_attention(config: MultimodalConfig, attention: str) -> MultimodalConfig:
    """``config`` with ``decoder.attention`` replaced (same parameters; validated)."""
    decoder = dataclasses.replace(config.decoder, attention=attention)
    return dataclasses.replace(config, decoder=decoder)

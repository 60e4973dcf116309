"""Training workdirs of random tiny models (written as ``python -m gazejax.train`` writes them),
and what they should generate."""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gazejax.checkpointing import Checkpointer, TrainState
from gazejax.configuration import base_config
from gazejax.data.packing import Text
from gazejax.data.vocab import vocabulary
from gazejax.gaze.inputs import MultimodalInputs
from gazejax.inference.probes import selections_at
from gazejax.inference.prompts import Prompt, pack_prompt
from gazejax.models.from_config import multimodal_config
from gazejax.models.mllm import MultimodalModel


def tiny_gaze_config() -> ml_collections.ConfigDict:
    """A training config of a tiny gaze model: 32-px images of 4×4 tokens, 4 regions of 2×2 per
    image, K=1, 2 context tokens, 2 layers; synthetic scenes of a 2×2 grid, 2-frame videos."""
    config = base_config(stage=2, attention="gaze")
    config.model.vit = {"variant": "mu/4", "patch_size": 8, "image_size": 32}  # 4x4 tokens
    config.model.decoder = dict(
        vocab_size=len(vocabulary()),
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    config.model.gaze.top_k = 1
    config.model.num_context_tokens = 2
    config.model.region_size = (2, 2, 1)  # 4 regions per unit
    config.data.synthetic = dict(
        image_size=32,
        grid=2,
        min_objects=1,
        max_objects=2,
        object_sizes=(0.6, 0.85),
        jitter=False,
        video_frames=2,
    )
    config.data.system_prompt = ""
    config.batch_size = 4
    return config


def save_random_workdir(
    root: pathlib.Path,
    config: ml_collections.ConfigDict,
    inputs: MultimodalInputs,
    scale: float = 1.0,
    step: int = 3,
) -> pathlib.Path:
    """Writes ``root/config.json`` and a step-``step`` checkpoint of a model of ``config.model``
    initialised on ``inputs`` (parameters times ``scale``: > 1 sharpens attention)."""
    model = MultimodalModel(multimodal_config(config.model))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), inputs))["params"]
    return save_workdir(root, config, jax.tree.map(lambda x: x * scale, params), step)


def save_workdir(
    root: pathlib.Path, config: ml_collections.ConfigDict, params, step: int = 3
) -> pathlib.Path:
    """Writes ``root/config.json`` and a step-``step`` checkpoint of ``params``."""
    (root / "config.json").write_text(config.to_json_best_effort(indent=2))
    state = TrainState(jnp.int32(step), params, optax.adam(1e-3).init(params))
    checkpointer = Checkpointer(str(root), every_steps=1, max_to_keep=1)
    checkpointer.save(step, state, config.to_dict(), {})
    checkpointer.close()
    return root


def greedy_reference(
    model: MultimodalModel, params, prompt: Prompt, count: int, top_k: int | None
) -> tuple[list[int], list[np.ndarray | None]]:
    """Greedy tokens by re-running the whole sequence (no cache) for every new token, and the
    selection of the query that predicted each (None for dense attention)."""
    forward = jax.jit(
        lambda inputs: model.apply(
            {"params": params}, inputs, top_k=top_k, mutable=["intermediates"]
        )
    )
    tokens, selections = [], []
    for _ in range(count):
        items = prompt.items + ([Text(np.asarray(tokens, np.int32))] if tokens else [])
        full = pack_prompt(model.config, items, pad_multiple=64)  # one shape: one compilation
        logits, state = forward(full.inputs)
        tokens.append(int(jnp.argmax(logits[0, full.last_slot])))
        selection = selections_at(state, full.last_slot)
        selections.append(None if selection is None else np.asarray(selection))
    return tokens, selections

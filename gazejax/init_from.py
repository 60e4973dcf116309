"""Initialises parts of the multimodal model from converted checkpoints (``config.init_from``).

``init_from.vision`` and ``init_from.decoder`` name a local Hugging Face folder (``config.json``
+ safetensors) or a gazejax folder (``model.json`` + orbax params, from
``python -m gazejax.convert``). ``init_from.mllm`` names a Hugging Face
``LlavaForConditionalGeneration`` folder and initialises the ViT, the projector and the decoder
(it must describe the architecture the config builds). The checkpoint must have exactly the
shapes the config builds, but for the vocabulary, which may grow: a tokenizer that gained
``<image>`` / ``<video>`` (:func:`gazejax.data.vocab.add_visual_placeholders`) needs a larger
``model.decoder.vocab_size``, and the rows beyond the checkpoint's (embedding rows, untied head
columns) start as the mean of the checkpoint's rows (:func:`grow_vocab`). Context tokens are in
no checkpoint: they keep the model's initialisation, normal with standard deviation 0.02
(:class:`MultimodalModel`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from gazejax.checkpointing import Checkpointer
from gazejax.convert import ConversionError, family_for_model, load_hf
from gazejax.convert.hf import build_model, read_hf_config
from gazejax.convert.mapping import flatten
from gazejax.convert.native import load_gazejax
from gazejax.models.mllm import MultimodalConfig, MultimodalModel
from gazejax.paths import as_path


def load_part(path: str, overrides: Mapping) -> dict:
    """The ``params`` of a checkpoint folder (HF or gazejax), with module ``overrides``."""
    if (as_path(path) / "model.json").exists():
        _, params = load_gazejax(path)
        return params
    _, params = load_hf(path, **overrides)
    return params


def _architecture(model: MultimodalModel) -> dict:
    """The LLaVA ``config.json`` of ``model``, less what does not change its function (LLaVA
    never runs the tower's pooling head)."""
    config = family_for_model(model).hf_config(model)
    for key in ("max_position_embeddings", "vocab_size"):  # the vocabulary may grow
        config["text_config"].pop(key)
    config["vision_config"].pop("vision_use_head")
    return config


def grow_vocab(decoder: dict, vocab_size: int) -> dict:
    """``decoder`` params with ``vocab_size`` rows: the embedding's added rows (and an untied
    head's added columns) are the mean of the existing ones, so tokens a tokenizer gained start
    as the average token. Unchanged when the checkpoint has ``vocab_size`` rows or more."""
    embedding = np.asarray(decoder["embed_tokens"]["embedding"])  # [vocab, hidden]
    extra = vocab_size - embedding.shape[0]
    if extra <= 0:
        return decoder

    def grown(table: np.ndarray, axis: int) -> np.ndarray:
        mean = table.mean(axis, keepdims=True)
        return np.concatenate([table, np.repeat(mean, extra, axis)], axis)

    decoder = {**decoder, "embed_tokens": {"embedding": grown(embedding, 0)}}
    if "lm_head" in decoder:  # kernel [hidden, vocab]
        kernel = np.asarray(decoder["lm_head"]["kernel"])
        decoder["lm_head"] = {**decoder["lm_head"], "kernel": grown(kernel, 1)}
    return decoder


def load_mllm(path: str | os.PathLike, config: MultimodalConfig) -> dict:
    """The ``vision``, ``projector`` and ``decoder`` params of the Hugging Face LLaVA folder
    ``path``, laid out for ``config`` (e.g. a scanned ViT, a grown vocabulary); no context
    tokens.

    Raises:
      ConversionError: the folder describes another architecture than ``config`` (naming it),
        or ``config`` is one LLaVA cannot express.
    """
    dense = dataclasses.replace(config, num_context_tokens=0)
    source = os.path.join(os.fspath(path), "config.json")
    stored, _ = build_model(read_hf_config(path), source)
    vocab_size = stored.config.decoder.vocab_size
    folder = flatten(_architecture(stored))
    wanted = flatten(_architecture(MultimodalModel(dense)))
    differences = sorted(
        f"{'.'.join(k)}: {folder.get(k)} (config: {wanted.get(k)})"
        for k in set(folder) | set(wanted)
        if folder.get(k) != wanted.get(k)
    )
    if differences:
        raise ConversionError(f"{source} describes another model than the config: {differences}")
    _, params = load_hf(
        path,
        vit=dense.vit,
        projector=dense.projector,
        decoder=dataclasses.replace(dense.decoder, vocab_size=vocab_size),
        region_size=dense.region_size,
    )
    params["decoder"] = grow_vocab(params["decoder"], config.decoder.vocab_size)
    return params


def load_workdir_params(workdir: str, abstract_params: Any) -> Any:
    """The parameters of the latest checkpoint of the training workdir ``workdir`` (e.g. a
    stage-1 run: projector and context tokens included), restored into the shardings of
    ``abstract_params``; its optimizer state is not read.

    Raises:
      ConversionError: naming ``workdir``, when it has no checkpoint or its parameters do not
        fit ``abstract_params``.
    """
    checkpointer = Checkpointer(workdir, every_steps=1, max_to_keep=None)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise ConversionError(f"init_from.workdir={workdir} has no checkpoint")
        return checkpointer.restore_params(steps[-1], abstract_params)
    except (ValueError, KeyError) as error:
        raise ConversionError(
            f"init_from.workdir={workdir}: its parameters do not fit the model: {error}"
        ) from error
    finally:
        checkpointer.close()


def _placed(new, old):
    """``new`` (a host array, the same on every host) in ``old``'s dtype, on ``old``'s sharding
    when ``old`` is a ``jax.Array``: each host puts only its own devices' shards (no transfer of
    a whole parameter to one device, nothing fetched back)."""
    value = np.asarray(new, dtype=old.dtype)
    if not isinstance(old, jax.Array):
        return value
    return jax.make_array_from_callback(value.shape, old.sharding, lambda index: value[index])


def init_from_checkpoints(
    params: dict, init_from: Mapping[str, str], model_config: MultimodalConfig
) -> dict:
    """``params`` with subtrees replaced by checkpoints: ``mllm`` (vision, projector, decoder),
    then ``vision`` and / or ``decoder`` (which win over the ``mllm`` ones).

    Raises:
      ConversionError: naming the checkpoint and every parameter whose shape differs from the
        model's (e.g. a config built for another model size).
    """
    params = dict(params)
    overrides = {"vision": {"scan": model_config.vit.scan}, "decoder": {}}
    loaded: dict[str, tuple[str, dict]] = {}
    if init_from.get("mllm"):
        path = init_from["mllm"]
        try:
            parts = load_mllm(path, model_config)
        except ConversionError as error:
            raise ConversionError(f"init_from.mllm={path}: {error}") from error
        loaded.update({part: (f"mllm={path}", tree) for part, tree in parts.items()})
    for part in ("vision", "decoder"):
        if init_from.get(part):
            path = init_from[part]
            loaded[part] = (f"{part}={path}", load_part(path, overrides[part]))
    if "decoder" in loaded:
        source, tree = loaded["decoder"]
        loaded["decoder"] = (source, grow_vocab(tree, model_config.decoder.vocab_size))
    for part, (source, tree) in loaded.items():
        want = {k: tuple(v.shape) for k, v in flatten(params[part]).items()}
        got = {k: tuple(np.shape(v)) for k, v in flatten(tree).items()}
        if want != got:
            problems = sorted(
                f"{'/'.join(k)}: checkpoint {got.get(k)} vs model {want.get(k)}"
                for k in set(want) | set(got)
                if want.get(k) != got.get(k)
            )
            raise ConversionError(f"init_from.{source} does not fit the model: {problems}")
        params[part] = jax.tree.map(_placed, tree, params[part])
    return params

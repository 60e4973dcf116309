"""LLaVA-family MLLMs: Hugging Face ``LlavaForConditionalGeneration`` <-> :class:`MultimodalModel`.

The Cambrian architecture in LLaVA's classes: a SigLIP / SigLIP2 (fixed resolution) vision tower,
a 2-layer GELU MLP projector (``multi_modal_projector.linear_{1,2}``) and a Qwen2 / Qwen2.5 /
Qwen3 text model. What the config says is honoured or refused:

- ``vision_feature_layer`` ``n`` (an int): the projector reads ``hidden_states[n]`` of the tower,
  without ``post_layernorm`` (``ViTConfig.output``, a block count); a list (concatenated layers)
  is refused.
- ``vision_feature_select_strategy``: ``"full"``; ``"default"`` drops the first token (a CLS
  token SigLIP has not) and is refused.
- ``vision_config.image_size``: the ViT's image size; ``image_token_index``: checked against the
  vocabulary (gazejax never feeds it to the model: packing puts each unit's tokens where the
  ``<image>`` placeholder was; it is written back on export).

The imported model is dense with no context tokens (``num_context_tokens=0``), regions of
6×6×1 (DESIGN.md's default, cut to the unit grid; a ``region_size`` override of ``load_hf``
changes storage only: dense logits do not depend on it).
Turning gaze on adds context tokens initialised as training initialises them (normal, std 0.02),
see :func:`gazejax.inference.checkpoints.with_gaze`.

Tensor keys: every writer's prefixes are read (``language_model.model.`` or
``model.language_model.``, ``language_model.lm_head.`` or ``lm_head.``, ``vision_tower.`` or
``model.vision_tower.`` with or without ``vision_model.``, ``multi_modal_projector.`` or
``model.multi_modal_projector.``); export writes what transformers' own ``save_pretrained``
writes (the first of each pair).
"""

from __future__ import annotations

import dataclasses
import re

from gazejax.convert import qwen, siglip
from gazejax.convert.family import Family
from gazejax.convert.mapping import ConversionError, Rule, rule, transpose
from gazejax.gaze.inputs import MultimodalInputs
from gazejax.models.decoder import Decoder
from gazejax.models.mllm import MultimodalConfig, MultimodalModel
from gazejax.models.projector import ProjectorConfig
from gazejax.models.vit import VisionTransformer

DEFAULT_REGION_SIDE = 6  # DESIGN.md's 6×6×1 regions, at most the unit grid
_TEXT_TYPES = ("qwen2", "qwen3")
_VISION_TYPES = ("siglip_vision_model",)
# Stored prefix -> the prefix the rules use; applied in order.
_RENAMES = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.(vision_tower|multi_modal_projector)\.", r"\1."),
    (r"^vision_tower\.vision_model\.", "vision_tower."),
)


def rename(key: str) -> str:
    """A stored key in the spelling of transformers' ``save_pretrained`` (see the module doc)."""
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def _feature_blocks(layer, depth: int) -> int:
    """``vision_feature_layer`` as a count of blocks in ``[0, depth]``."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ConversionError(
            f"llava: vision_feature_layer {layer!r} is not supported (only one layer, an int)"
        )
    blocks = layer if layer >= 0 else depth + 1 + layer
    if not 0 <= blocks <= depth:
        raise ConversionError(
            f"llava: vision_feature_layer {layer} is outside the tower's {depth + 1} hidden states"
        )
    return blocks


def multimodal_config_from_hf(hf: dict) -> MultimodalConfig:
    """The :class:`MultimodalConfig` of a ``llava`` ``config.json`` dict (dense, no context)."""
    text, vision = hf["text_config"], hf["vision_config"]
    for part, types in (("text_config", _TEXT_TYPES), ("vision_config", _VISION_TYPES)):
        model_type = hf[part].get("model_type")
        if model_type not in types:
            raise ConversionError(f"llava: {part}.model_type {model_type!r} is not one of {types}")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy != "full":
        raise ConversionError(
            f"llava: vision_feature_select_strategy {strategy!r} is not supported (only 'full': "
            "'default' drops the first token, a CLS token SigLIP does not have)"
        )
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise ConversionError(
            f"llava: projector_hidden_act {hf['projector_hidden_act']!r} is not supported "
            "(only 'gelu')"
        )
    if not hf.get("multimodal_projector_bias", True):
        raise ConversionError("llava: multimodal_projector_bias=False is not supported")
    tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    decoder = qwen.decoder_config_from_hf({**text, "tie_word_embeddings": tie})
    image_token = hf.get("image_token_index", hf.get("image_token_id"))
    if not isinstance(image_token, int) or not 0 <= image_token < decoder.vocab_size:
        raise ConversionError(
            f"llava: image_token_index {image_token!r} is not a token id below vocab_size "
            f"{decoder.vocab_size}"
        )
    vit = siglip.vit_config_from_hf(vision)
    blocks = _feature_blocks(hf.get("vision_feature_layer", -2), vit.depth)
    vit = dataclasses.replace(vit, output=blocks)
    side = min(DEFAULT_REGION_SIDE, vit.grid)
    return MultimodalConfig(
        vit=vit,
        projector=ProjectorConfig(vision_width=vit.width, hidden_size=decoder.hidden_size),
        decoder=decoder,
        num_context_tokens=0,
        region_size=(side, side, 1),
    )


def hf_config(model: MultimodalModel) -> dict:
    """The ``config.json`` of ``model`` as a ``LlavaForConditionalGeneration``.

    ``image_token_index`` is left None: the vocabulary's ``<image>`` id, which the caller adds
    (``save_hf(..., config={"image_token_index": i})``).

    Raises:
      ConversionError: a model the class cannot express (token compression; a ViT output after
        the final LayerNorm, which no ``hidden_states[n]`` is).
    """
    cfg = model.config
    if cfg.projector.compress:
        raise ConversionError(
            "llava: a projector with token compression (model.projector.compress=True) has no "
            "LlavaForConditionalGeneration equivalent"
        )
    if cfg.vit.output_blocks is None:
        raise ConversionError(
            "llava: the ViT's output is after its final LayerNorm (model.vit.output='last'), "
            "which LLaVA's vision_feature_layer cannot express; train with output='penultimate' "
            "or a block count"
        )
    decoder = qwen.hf_config(Decoder(cfg.decoder))
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "text_config": decoder,
        "vision_config": siglip.hf_config(VisionTransformer(cfg.vit)),
        "vision_feature_layer": cfg.vit.output_blocks - cfg.vit.depth - 1,
        "vision_feature_select_strategy": "full",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "image_seq_length": cfg.unit_grid[0] * cfg.unit_grid[1],
        "image_token_index": None,
        "tie_word_embeddings": decoder["tie_word_embeddings"],
    }


def _moved(rules: list[Rule], path: str, key_prefixes: dict[str, str]) -> list[Rule]:
    """``rules`` with paths under ``path`` and each key's first matching prefix replaced."""

    def move(key: str) -> str:
        for old, new in key_prefixes.items():
            if key.startswith(old):
                return new + key[len(old) :]
        return key

    return [
        dataclasses.replace(r, path=(path, *r.path), keys=tuple(move(k) for k in r.keys))
        for r in rules
    ]


def rules(model: MultimodalModel, hf: dict) -> list[Rule]:
    """The parameter table: the Qwen and SigLIP tables moved under the LLaVA prefixes, and the
    projector's two linear layers."""
    del hf
    cfg = model.config
    text = qwen.rules(Decoder(cfg.decoder), {})
    vision = siglip.rules(VisionTransformer(cfg.vit), {"model_type": "siglip_vision_model"})
    projector = [
        rule(f"{ours}/kernel", f"multi_modal_projector.{theirs}.weight", transpose, transpose)
        for ours, theirs in (("fc1", "linear_1"), ("fc2", "linear_2"))
    ] + [
        rule(f"{ours}/bias", f"multi_modal_projector.{theirs}.bias")
        for ours, theirs in (("fc1", "linear_1"), ("fc2", "linear_2"))
    ]
    return [
        *_moved(
            text,
            "decoder",
            {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."},
        ),
        *_moved(vision, "vision", {"": "vision_tower."}),
        *_moved(projector, "projector", {}),
    ]


def ignore(hf: dict) -> str | None:
    """The text model's ignorable tensors (old RoPE buffers, a tied head's duplicate) and the
    vision tower's pooling head when the model has none (LLaVA never runs it)."""
    text = hf["text_config"]
    tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    text_patterns = qwen.ignore({"tie_word_embeddings": tie})
    return (
        text_patterns.replace("^lm_head", r"^language_model\.lm_head") + r"|^vision_tower\.head\."
    )


def example_inputs(model: MultimodalModel) -> tuple[MultimodalInputs]:
    geometry = model.config.geometry
    slots = geometry.slots_per_unit
    return (MultimodalInputs.abstract(geometry, 1, slots, 1, geometry.tokens_per_unit),)


FAMILY = Family(
    name="llava",
    model_types=("llava",),
    module_type=MultimodalModel,
    build=lambda hf: MultimodalModel(multimodal_config_from_hf(hf)),
    rules=rules,
    ignore=ignore,
    example_inputs=example_inputs,
    hf_config=hf_config,
    rename=rename,
    carried=("image_token_index",),
)

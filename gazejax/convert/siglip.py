"""SigLIP / SigLIP2 vision towers: Hugging Face ``SiglipVisionModel`` / ``SiglipModel`` <->
:class:`VisionTransformer`.

Fixed-resolution SigLIP2 checkpoints use these SigLIP classes too (``model_type`` ``"siglip"``).
Key prefixes: a two-tower ``SiglipModel`` keeps the vision tower under ``vision_model.`` (its
text tower is ignored); a ``SiglipVisionModel`` has no prefix when written by transformers >= 5
and ``vision_model.`` when written by transformers 4 (told apart by ``transformers_version``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gazejax.convert.family import Family
from gazejax.convert.mapping import ConversionError, Rule, rule
from gazejax.models.vit import VisionTransformer, ViTConfig

# Defaults of transformers' SiglipVisionConfig: config.json files leave them out.
_HF_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    vision_use_head=True,
)


def _vision_config(hf: dict) -> dict:
    """The vision tower's config with defaults filled in."""
    if hf["model_type"] == "siglip":
        return {**_HF_DEFAULTS, **(hf.get("vision_config") or {})}
    return {**_HF_DEFAULTS, **hf}


def _square(hf: dict, name: str) -> int:
    value = hf[name]
    if isinstance(value, int):
        return value
    if len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise ConversionError(f"siglip: non-square {name} {value!r} is not supported")


def vit_config_from_hf(hf: dict) -> ViTConfig:
    """The ``ViTConfig`` of a SigLIP ``config.json`` dict (two-tower or vision-only)."""
    v = _vision_config(hf)
    if v["hidden_act"] != "gelu_pytorch_tanh":
        raise ConversionError(
            f"siglip: hidden_act {v['hidden_act']!r} is not supported (only 'gelu_pytorch_tanh')"
        )
    if v["num_channels"] != 3:
        raise ConversionError(f"siglip: num_channels {v['num_channels']} is not supported (only 3)")
    return ViTConfig(
        width=v["hidden_size"],
        depth=v["num_hidden_layers"],
        mlp_dim=v["intermediate_size"],
        num_heads=v["num_attention_heads"],
        patch_size=_square(v, "patch_size"),
        image_size=_square(v, "image_size"),
        layer_norm_eps=v["layer_norm_eps"],
        pool="map" if v["vision_use_head"] else "none",
    )


def hf_config(model: VisionTransformer) -> dict:
    """The ``config.json`` of a ``SiglipVisionModel`` with ``model``'s architecture."""
    cfg = model.config
    return {
        "model_type": "siglip_vision_model",
        "architectures": ["SiglipVisionModel"],
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "num_channels": 3,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "vision_use_head": cfg.pool == "map",
    }


def layer_rules(
    config: ViTConfig, block: list[Rule], key_prefix: Callable[[int], str]
) -> list[Rule]:
    """Expands one block's rules (paths and keys relative to the block) to every block.

    ``key_prefix(i)`` is block ``i``'s key prefix. Paths go under ``layers_{i}``, or under
    ``layers`` with one key per block (stacked on a leading axis) when ``config.scan``.
    """
    if config.scan:
        return [
            Rule(
                ("layers", *r.path),
                tuple(key_prefix(i) + r.keys[0] for i in range(config.depth)),
                r.to_flax,
                r.to_ckpt,
            )
            for r in block
        ]
    return [
        Rule((f"layers_{i}", *r.path), (key_prefix(i) + r.keys[0],), r.to_flax, r.to_ckpt)
        for i in range(config.depth)
        for r in block
    ]


def _linear(
    path: str, key: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> list[Rule]:
    """torch ``Linear`` ``[out, in]`` (+ bias) <-> kernel ``[*in_shape, *out_shape]`` (+ bias)."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return [
        rule(
            f"{path}/kernel",
            f"{key}.weight",
            lambda w: w.T.reshape(*in_shape, *out_shape),
            lambda k: k.reshape(n_in, n_out).T,
        ),
        rule(
            f"{path}/bias",
            f"{key}.bias",
            lambda b: b.reshape(out_shape),
            lambda b: b.reshape(n_out),
        ),
    ]


def _layer_norm(path: str, key: str) -> list[Rule]:
    return [rule(f"{path}/scale", f"{key}.weight"), rule(f"{path}/bias", f"{key}.bias")]


def _mlp(path: str, key: str, cfg: ViTConfig) -> list[Rule]:
    return [
        *_linear(f"{path}/fc1", f"{key}.fc1", (cfg.width,), (cfg.mlp_dim,)),
        *_linear(f"{path}/fc2", f"{key}.fc2", (cfg.mlp_dim,), (cfg.width,)),
    ]


def _map_head(cfg: ViTConfig) -> list[Rule]:
    """``head.*``: torch ``MultiheadAttention`` packs q, k, v in ``in_proj_weight [3 * width,
    width]``; ours is ``in_proj_kernel [3, width, heads, head_dim]``."""
    heads = (cfg.num_heads, cfg.head_dim)
    qkv = (3, *heads)
    return [
        rule("head/probe", "head.probe"),
        rule(
            "head/in_proj_kernel",
            "head.attention.in_proj_weight",
            lambda w: w.reshape(*qkv, cfg.width).transpose(0, 3, 1, 2),
            lambda k: k.transpose(0, 2, 3, 1).reshape(3 * cfg.width, cfg.width),
        ),
        rule(
            "head/in_proj_bias",
            "head.attention.in_proj_bias",
            lambda b: b.reshape(qkv),
            lambda b: b.reshape(-1),
        ),
        *_linear("head/out", "head.attention.out_proj", heads, (cfg.width,)),
        *_layer_norm("head/norm", "head.layernorm"),
        *_mlp("head/mlp", "head.mlp", cfg),
    ]


def _key_prefix(hf: dict) -> str:
    if hf["model_type"] == "siglip":
        return "vision_model."
    major = int(str(hf.get("transformers_version", "5")).split(".")[0])
    return "vision_model." if major < 5 else ""


def rules(model: VisionTransformer, hf: dict) -> list[Rule]:
    """The parameter table of ``model``; ``hf`` (the checkpoint's config) fixes the key prefix."""
    cfg = model.config
    heads = (cfg.num_heads, cfg.head_dim)
    block = [
        *_layer_norm("norm1", "layer_norm1"),
        *_linear("attn/query", "self_attn.q_proj", (cfg.width,), heads),
        *_linear("attn/key", "self_attn.k_proj", (cfg.width,), heads),
        *_linear("attn/value", "self_attn.v_proj", (cfg.width,), heads),
        *_linear("attn/out", "self_attn.out_proj", heads, (cfg.width,)),
        *_layer_norm("norm2", "layer_norm2"),
        *_mlp("mlp", "mlp", cfg),
    ]
    table = [
        rule(
            "embedding/kernel",
            "embeddings.patch_embedding.weight",
            lambda w: w.transpose(2, 3, 1, 0),
            lambda k: k.transpose(3, 2, 0, 1),
        ),  # OIHW <-> HWIO
        rule("embedding/bias", "embeddings.patch_embedding.bias"),
        rule("pos_embedding", "embeddings.position_embedding.weight"),
        *_layer_norm("norm", "post_layernorm"),
        *(_map_head(cfg) if cfg.pool == "map" else []),
    ]
    prefix = _key_prefix(hf)
    return [
        *(dataclasses.replace(r, keys=(prefix + r.keys[0],)) for r in table),
        *layer_rules(cfg, block, lambda i: f"{prefix}encoder.layers.{i}."),
    ]


def ignore(hf: dict) -> str | None:
    """The text tower and logit scale / bias of a two-tower checkpoint."""
    return r"^(text_model\.|logit_scale$|logit_bias$)" if hf["model_type"] == "siglip" else None


def example_inputs(model: VisionTransformer) -> tuple[jax.ShapeDtypeStruct, ...]:
    size = model.config.image_size
    return (jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),)


FAMILY = Family(
    name="siglip",
    model_types=("siglip", "siglip_vision_model"),
    module_type=VisionTransformer,
    build=lambda hf: VisionTransformer(vit_config_from_hf(hf)),
    rules=rules,
    ignore=ignore,
    example_inputs=example_inputs,
    hf_config=hf_config,
)

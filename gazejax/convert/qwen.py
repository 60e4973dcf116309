"""Qwen3 / Qwen2 / Qwen2.5 causal LMs: Hugging Face ``*ForCausalLM`` <-> :class:`Decoder`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gazejax.convert.family import Family
from gazejax.convert.mapping import ConversionError, Rule, rule, transpose
from gazejax.models.decoder import Decoder, DecoderConfig

_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def decoder_config_from_hf(hf: dict) -> DecoderConfig:
    """Reads a Qwen ``config.json`` dict; rejects features gazejax does not implement."""
    model_type = hf["model_type"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(
            f"{model_type}: rope_type {rope_type!r} is not supported (only 'default')"
        )
    if hf.get("use_sliding_window", False):
        raise ConversionError(f"{model_type}: use_sliding_window=True is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{model_type}: hidden_act {hf['hidden_act']!r} is not supported")
    num_heads = hf["num_attention_heads"]
    is_qwen3 = model_type == "qwen3"
    attention_bias = hf.get("attention_bias", False)
    return DecoderConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        qk_norm=is_qwen3,
        qkv_bias=attention_bias if is_qwen3 else True,
        out_bias=attention_bias if is_qwen3 else False,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
    )


def hf_config(model: Decoder) -> dict:
    """The ``config.json`` of ``model`` (``qwen3`` if it has q/k norm, else ``qwen2``)."""
    cfg = model.config
    model_type = "qwen3" if cfg.qk_norm else "qwen2"
    if cfg.qk_norm and cfg.qkv_bias != cfg.out_bias:
        raise ConversionError("qwen3 needs qkv_bias == out_bias (HF attention_bias)")
    if not cfg.qk_norm and (not cfg.qkv_bias or cfg.out_bias):
        raise ConversionError("qwen2 needs qkv_bias=True and out_bias=False")
    config = {
        "model_type": model_type,
        "architectures": [_ARCHITECTURES[model_type]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "use_sliding_window": False,
    }
    if cfg.qk_norm:
        config["attention_bias"] = cfg.qkv_bias
    return config


def rules(model: Decoder, hf: dict) -> list[Rule]:
    """The parameter table; attention weights are reshaped to ``[embed, heads, head_dim]``."""
    del hf
    cfg = model.config
    hidden, hd = cfg.hidden_size, cfg.head_dim

    def split_heads(heads):
        to_flax = lambda w: transpose(w).reshape(hidden, heads, hd)  # noqa: E731
        to_ckpt = lambda k: transpose(k.reshape(hidden, heads * hd))  # noqa: E731
        return to_flax, to_ckpt

    def split_bias(heads):
        return (lambda b: b.reshape(heads, hd)), (lambda b: b.reshape(heads * hd))

    out_to_flax = lambda w: transpose(w).reshape(cfg.num_heads, hd, hidden)  # noqa: E731
    out_to_ckpt = lambda k: transpose(k.reshape(cfg.num_heads * hd, hidden))  # noqa: E731

    table = [
        rule("embed_tokens/embedding", "model.embed_tokens.weight"),
        rule("norm/scale", "model.norm.weight"),
    ]
    if not cfg.tie_embeddings:
        table.append(rule("lm_head/kernel", "lm_head.weight", transpose, transpose))
    for i in range(cfg.num_layers):
        ours, theirs = f"layers_{i}", f"model.layers.{i}"
        for proj, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
            table.append(
                rule(
                    f"{ours}/self_attn/{proj}_proj/kernel",
                    f"{theirs}.self_attn.{proj}_proj.weight",
                    *split_heads(heads),
                )
            )
            if cfg.qkv_bias:
                table.append(
                    rule(
                        f"{ours}/self_attn/{proj}_proj/bias",
                        f"{theirs}.self_attn.{proj}_proj.bias",
                        *split_bias(heads),
                    )
                )
        table.append(
            rule(
                f"{ours}/self_attn/o_proj/kernel",
                f"{theirs}.self_attn.o_proj.weight",
                out_to_flax,
                out_to_ckpt,
            )
        )
        if cfg.out_bias:
            table.append(rule(f"{ours}/self_attn/o_proj/bias", f"{theirs}.self_attn.o_proj.bias"))
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                table.append(
                    rule(f"{ours}/self_attn/{norm}/scale", f"{theirs}.self_attn.{norm}.weight")
                )
        for proj in ("gate_proj", "up_proj", "down_proj"):
            table.append(
                rule(
                    f"{ours}/mlp/{proj}/kernel", f"{theirs}.mlp.{proj}.weight", transpose, transpose
                )
            )
        for norm in ("input_layernorm", "post_attention_layernorm"):
            table.append(rule(f"{ours}/{norm}/scale", f"{theirs}.{norm}.weight"))
    return table


def ignore(hf: dict) -> str | None:
    """RoPE buffers saved by old exporters, and a duplicate LM head in tied checkpoints."""
    patterns = [r"rotary_emb\.inv_freq$"]
    if hf.get("tie_word_embeddings", False):
        patterns.append(r"^lm_head\.weight$")
    return "|".join(patterns)


FAMILY = Family(
    name="qwen",
    model_types=("qwen3", "qwen2"),
    module_type=Decoder,
    build=lambda hf: Decoder(decoder_config_from_hf(hf)),
    rules=rules,
    ignore=ignore,
    example_inputs=lambda model: (jax.ShapeDtypeStruct((1, 1), jnp.int32),),
    hf_config=hf_config,
)

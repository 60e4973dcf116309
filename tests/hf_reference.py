"""Tiny random Hugging Face reference models, saved to a folder for ``load_hf``."""

from __future__ import annotations

import os

import torch
import transformers


def perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Random norm scales, so a norm that is loaded wrongly (or not at all) shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=gen))


def save_qwen(
    folder: str | os.PathLike,
    model_type: str = "qwen3",
    seed: int = 0,
    **overrides,
) -> transformers.PreTrainedModel:
    """Builds a random tiny Qwen3 / Qwen2 causal LM, saves it to ``folder``, returns it (eval)."""
    config = dict(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    if model_type == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config))
    elif model_type == "qwen2":
        config.pop("head_dim")
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config))
    else:
        raise ValueError(model_type)
    perturb_norms(model, seed)
    model.eval()
    model.save_pretrained(folder)
    return model

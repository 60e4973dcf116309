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


# A tiny Qwen text model's config (transformers names).
TINY_QWEN = dict(
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


def perturb_biases(model: torch.nn.Module, seed: int) -> None:
    """Random biases (transformers initialises some to zero, where a lost bias would not show)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))


def save_qwen(
    folder: str | os.PathLike,
    model_type: str = "qwen3",
    seed: int = 0,
    **overrides,
) -> transformers.PreTrainedModel:
    """Builds a random tiny Qwen3 / Qwen2 causal LM, saves it to ``folder``, returns it (eval)."""
    config = {**TINY_QWEN, **overrides}
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


def save_llava(
    folder: str | os.PathLike,
    text_type: str = "qwen3",
    seed: int = 0,
    vision_feature_layer: int = -2,
    image_token_index: int = 100,
    tie_word_embeddings: bool = False,
    **text_overrides,
) -> transformers.PreTrainedModel:
    """A random tiny ``LlavaForConditionalGeneration``: a 2-block SigLIP tower on 16-px images of
    4×4 patches, a ``text_type`` (qwen3 / qwen2) text model, random norms and biases, saved to
    ``folder`` (eval mode)."""
    text = {
        **TINY_QWEN,
        "model_type": text_type,
        "tie_word_embeddings": tie_word_embeddings,
        **text_overrides,
    }
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_index,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="full",
        image_seq_length=16,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config)
    perturb_norms(model, seed)
    perturb_biases(model, seed)
    model.eval()
    model.save_pretrained(folder)
    return model

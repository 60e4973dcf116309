"""Checkpoint conversion: Hugging Face (safetensors) and big_vision (.npz) <-> gazejax.

model, params = gazejax.convert.load_hf("/path/to/Qwen3-4B")
logits = model.apply({"params": params}, input_ids)
gazejax.convert.save_hf(model, params, "/tmp/out")
"""

from gazejax.convert.hf import FAMILIES, family_for_model, family_for_model_type, load_hf, save_hf
from gazejax.convert.mapping import ConversionError, Rule, TensorSource, rule

__all__ = [
    "FAMILIES",
    "ConversionError",
    "Rule",
    "TensorSource",
    "family_for_model",
    "family_for_model_type",
    "load_hf",
    "rule",
    "save_hf",
]

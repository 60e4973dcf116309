"""Cambrian-7B for video: SigLIP2 So400m/16 at 384 + Qwen2.5-7B (qkv biases, no q/k norm,
untied embeddings), token compression on. Variants as in ``cambrian_4b_image.py`` but
``compress`` (always on for video)."""

from __future__ import annotations

import ml_collections

from gazejax.presets import QWEN25_7B, cambrian_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return cambrian_config(arg, QWEN25_7B, video=True)

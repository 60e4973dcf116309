"""Cambrian-4B for video: SigLIP2 So400m/16 at 384 + Qwen3-4B, token compression on.

Frames at 1 FPS, at most 32 (uniform subsampling beyond); each frame is 12x12 tokens in 4
regions of 6x6x1, with 4 context tokens. ``top_k=20`` regions attend to 720 + 128 of 4608 visual
entries. Variants as in ``cambrian_4b_image.py`` but ``compress`` (always on for video).
"""

from __future__ import annotations

import ml_collections

from gazejax.presets import QWEN3_4B, cambrian_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return cambrian_config(arg, QWEN3_4B, video=True)

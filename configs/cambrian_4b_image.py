"""Cambrian-4B for images (paper sec. 4.1): SigLIP2 So400m/16 at 384 px + Qwen3-4B.

    python -m gazejax.train --config configs/cambrian_4b_image.py:stage=1 --workdir runs/c4b-s1 \
        --config.data.jsonl.train=align.jsonl --config.data.jsonl.image_root=/data/images ...
    python -m gazejax.train --config configs/cambrian_4b_image.py:stage=2,attention=gaze ...
    python -m gazejax.train --config configs/cambrian_4b_image.py:stage=2,compress ...

Variants: ``stage=1|2``, ``attention=dense|gaze``, ``compress`` (the 3x3 stride-2 projector:
24x24 -> 12x12 tokens, with 3x3x1 regions), ``runlocal`` (a tiny model of the same shape
family, for smoke tests). 576 tokens an image in 16 regions of 36: ``top_k=4`` attends to
144 + 4 visual entries (paper Table 1: 288+4, 144+4, 72+4 for K = 8, 4, 2).
"""

from __future__ import annotations

import ml_collections

from gazejax.presets import QWEN3_4B, cambrian_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return cambrian_config(arg, QWEN3_4B, video=False)

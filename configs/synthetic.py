"""The embedded default: a tiny ViT + tiny Qwen3-style decoder trained from scratch on the
synthetic visual-QA set, on a CPU.

    python -m gazejax.train --config configs/synthetic.py --workdir runs/synthetic
    python -m gazejax.train --config configs/synthetic.py:attention=gaze --workdir runs/gaze
    python -m gazejax.train --config configs/synthetic.py:runlocal --workdir /tmp/smoke

Variants (comma-separated after the colon): ``attention=dense|gaze``, ``stage=1|2``,
``runlocal`` (a few steps, a smoke test).
"""

from __future__ import annotations

import ml_collections

from gazejax.configuration import base_config, parse_variant
from gazejax.data.synthetic import TASKS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = parse_variant(arg)
    config = base_config(int(variant.get("stage", 2)), variant.get("attention", "dense"))
    config.total_steps = 1800
    config.batch_size = 16

    config.model.vit = dict(
        variant="mu/4", patch_size=8, image_size=64, width=96, depth=3, mlp_dim=192, num_heads=3
    )
    config.model.decoder = dict(
        vocab_size=128,  # the built-in tokenizer has 115 tokens
        hidden_size=128,
        intermediate_size=256,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        rope_theta=10000.0,
        tie_embeddings=True,
    )
    config.model.region_size = (2, 2, 1)  # 16 regions of 4 tokens per 8x8 image grid
    config.model.gaze.top_k = 4  # 4 x 4 = 16 of 64 visual tokens per image (25 %)

    config.data.synthetic = dict(
        image_size=64,
        grid=4,
        min_objects=1,
        max_objects=2,
        object_sizes=(0.6, 0.9),  # of a 16-pixel cell: shapes large enough to tell apart
        video_frames=4,
        # Video questions cost ~3x an image question's compute; half weight keeps the run short.
        tasks={task: 0.5 if family == "video" else 1.0 for task, (family, _) in TASKS.items()},
    )
    # Images and videos train in separate batches (buckets), each padded to its own shape:
    # slots = text + units x (64 visual + context tokens); regions = units x 16.
    config.data.buckets = dict(
        image=dict(length=112, max_units=1, num_regions=16),
        video=dict(length=320, max_units=4, num_regions=64),
    )
    config.data.system_prompt = ""  # ChatML with an empty system turn: shorter sequences

    config.optim.learning_rate = 2e-3
    config.eval_every_steps = 300

    if "runlocal" in variant:
        config.total_steps = 6
        config.batch_size = 4
        config.optim.warmup_steps = 2
        config.log_every_steps = 2
        config.checkpoint_every_steps = 3
        config.eval_every_steps = 6
        config.eval_examples = 8
    return config

"""The embedded default: a tiny ViT + tiny Qwen3-style decoder trained from scratch on the
synthetic visual-QA set, on a CPU.

    python -m gazejax.train --config configs/synthetic.py --workdir runs/synthetic
    python -m gazejax.train --config configs/synthetic.py:attention=gaze --workdir runs/gaze
    python -m gazejax.train --config configs/synthetic.py:runlocal --workdir /tmp/smoke
    python -m gazejax.train --config configs/synthetic.py:turns=3 --workdir runs/multiturn
    python -m gazejax.train --config configs/synthetic.py:turns=3,objects=4 --workdir runs/mt4

Variants (comma-separated after the colon): ``attention=dense|gaze``, ``stage=1|2``,
``turns=N`` (N questions per scene, 1 to 4: a conversation, every answer supervised; the
buckets grow to fit), ``objects=N`` (at most N objects per scene, 2 to 6; default 2),
``runlocal`` (a few steps, a smoke test).
"""

from __future__ import annotations

import ml_collections

from gazejax.configuration import VARIANTS, base_config, parse_variant
from gazejax.data.synthetic import TASKS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = parse_variant(
        arg, {**VARIANTS, "turns": ("1", "2", "3", "4"), "objects": ("2", "3", "4", "5", "6")}
    )
    turns = int(variant.get("turns", 1))
    config = base_config(int(variant.get("stage", 2)), variant.get("attention", "dense"))
    config.total_steps = 2400
    config.batch_size = 16

    # 96 px images, 16 px patches: a 6 x 6 grid of visual tokens, one per cell of the scene's
    # 6 x 6 layout, each object centred in its cell (one token sees one whole object).
    config.model.vit = dict(
        variant="mu/4", patch_size=16, image_size=96, width=96, depth=3, mlp_dim=192, num_heads=3
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
    config.model.region_size = (2, 2, 1)  # 9 regions of 4 tokens per 6x6 image grid
    config.model.gaze.top_k = 2  # 2 x 4 = 8 of 36 visual tokens per image (22 %)

    config.data.synthetic = dict(
        image_size=96,
        grid=6,
        min_objects=1,
        max_objects=int(variant.get("objects", 2)),
        object_sizes=(0.6, 0.85),  # of a 16-pixel cell: 10 and 14 px
        jitter=False,
        video_frames=4,
        # Video questions cost ~3x an image question's compute; half weight keeps the run short.
        tasks={task: 0.5 if family == "video" else 1.0 for task, (family, _) in TASKS.items()},
    )
    if turns > 1:  # a conversation per scene (unset: 1, so older runs' configs still resume)
        config.data.synthetic.turns = turns
    # Images and videos train in separate batches (buckets), each padded to its own shape:
    # slots = text + units x (36 visual + context tokens); regions = units x 9. A later turn's
    # question and answer take at most ~34 more tokens.
    more = 40 * (turns - 1)
    config.data.buckets = dict(
        image=dict(length=80 + more, max_units=1, num_regions=9),
        video=dict(length=200 + more, max_units=4, num_regions=36),
    )
    config.data.system_prompt = ""  # ChatML with an empty system turn: shorter sequences

    # 2e-3 made the model learn one attribute (colour or shape, whichever was asked more) and
    # never the other; 3e-4 learns both.
    config.optim.learning_rate = 3e-4
    config.eval_every_steps = 400

    if "runlocal" in variant:
        config.total_steps = 6
        config.batch_size = 4
        config.optim.warmup_steps = 2
        config.log_every_steps = 2
        config.checkpoint_every_steps = 3
        config.eval_every_steps = 6
        config.eval_examples = 8
    return config

"""Named model sizes and the Cambrian training recipe that the ``configs/cambrian_*`` files share.

Sizes follow the public checkpoints (SigLIP2 So400m/16 at 384 px, Qwen3-4B, Qwen2.5-7B), so a
converted checkpoint (``config.init_from``) fits the model the config builds.
"""

from __future__ import annotations

import ml_collections

from gazejax.configuration import VARIANTS, base_config, parse_variant

SIGLIP2_SO400M_16_384 = dict(variant="So400m/16", image_size=384, output="penultimate", remat=True)
QWEN3_4B = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_layers=36,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=1_000_000.0,
    tie_embeddings=True,
    qk_norm=True,
    remat=True,
)


def cambrian_config(arg: str | None, decoder: dict, video: bool) -> ml_collections.ConfigDict:
    """The shared shape of the Cambrian configs at variant ``arg`` (``get_config``'s): the
    common :data:`~gazejax.configuration.VARIANTS`, and ``compress`` for images (video always
    compresses). ``video`` switches to frame sequences."""
    variant = parse_variant(arg, VARIANTS if video else {**VARIANTS, "compress": ()})
    stage = int(variant.get("stage", 1))
    config = base_config(stage, variant.get("attention", "dense"))
    compress = video or "compress" in variant
    config.model.dtype = "bfloat16"
    config.model.vit = dict(SIGLIP2_SO400M_16_384)
    config.model.projector = dict(compress=compress)
    config.model.decoder = dict(decoder)
    config.model.region_size = (3, 3, 1) if compress and not video else (6, 6, 1)
    # Frames 4 at a time: the ViT skips the slots past the batch's longest video
    # (benchmarks/vision_units.py measures it).
    config.model.units_per_encode = 4 if video else 0
    config.model.gaze.top_k = 20 if video else (6 if compress else 4)
    tokens = 144 if compress else 576
    frames = 32 if video else 1
    regions_per_unit = tokens // (config.model.region_size[0] * config.model.region_size[1])
    config.data.name = "jsonl"
    config.data.jsonl.max_frames = frames
    config.data.buckets = dict(
        all=dict(
            length=frames * (tokens + 4) + 1536,
            max_units=frames,
            num_regions=frames * regions_per_unit,
        )
    )
    config.batch_size = 512 if stage == 1 else 128
    config.grad_accum_steps = 1
    config.total_steps = 5000
    config.optim.learning_rate = 1e-3 if stage == 1 else 2e-5
    config.optim.warmup_steps = 150
    config.optim.weight_decay = 0.0
    config.optim.lr_multipliers = () if stage == 1 else (("vision/.*", 0.1),)
    config.mesh.shape = [1, -1, 1, 1]  # FSDP over all devices
    config.checkpoint_every_steps = 500
    config.eval_every_steps = 1000
    if "runlocal" in variant:
        config.model.dtype = "float32"
        config.model.vit = dict(
            variant="mu/4",
            image_size=32,
            patch_size=4,
            width=32,
            depth=2,
            mlp_dim=64,
            num_heads=2,
            output="penultimate",
        )
        config.model.decoder = dict(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            tie_embeddings=decoder["tie_embeddings"],
            qk_norm=decoder.get("qk_norm", True),
            qkv_bias=decoder.get("qkv_bias", False),
        )
        config.model.region_size = (2, 2, 1)
        config.model.gaze.top_k = 2
        config.batch_size, config.total_steps = 2, 4
    return config


QWEN25_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    head_dim=128,
    rope_theta=1_000_000.0,
    tie_embeddings=False,
    qk_norm=False,
    qkv_bias=True,
    remat=True,
)

"""The training config: shared defaults, variant strings, and start-of-run validation.

Config files (``configs/*.py``) start from :func:`base_config` and override what differs, so
every config has every key. :func:`validate_config` then fails on unknown keys (typos in config
files; ``ml_collections`` already rejects unknown command-line overrides) and on combinations
that cannot work, naming the keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

from gazejax.sharding import DEFAULT_LOGICAL_AXIS_RULES


class ConfigError(ValueError):
    """A config key that is unknown, missing, of the wrong type, or inconsistent."""


VARIANTS: dict[str, tuple[str, ...]] = {
    "stage": ("1", "2"),
    "attention": ("dense", "gaze"),
    "runlocal": (),
}
"""The variants every config file takes: key -> allowed values (``()``: a flag, no value)."""


def parse_variant(
    arg: str | None, known: Mapping[str, tuple[str, ...]] = VARIANTS
) -> dict[str, str]:
    """``"stage=1,attention=gaze,runlocal"`` -> ``{"stage": "1", "attention": "gaze",
    "runlocal": "1"}`` (the string after ``config.py:`` on the command line).

    Args:
      known: the config file's variants: :data:`VARIANTS`, or a table that extends it.

    Raises:
      ConfigError: an unknown variant, a value that is not allowed or a flag given a value
        (listing the known variants).
    """
    out = {}
    for item in filter(None, (arg or "").split(",")):
        key, has_value, value = item.partition("=")
        allowed = known.get(key)
        if allowed is None or (value not in allowed if allowed else has_value):
            usage = ", ".join(f"{k}={'|'.join(v)}" if v else k for k, v in known.items())
            raise ConfigError(f"unknown config variant {item!r}; known: {usage}")
        out[key] = value or "1"
    return out


def base_config(stage: int = 2, attention: str = "dense") -> ml_collections.ConfigDict:
    """Every trainer key with a neutral default; config files fill in model and data."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 1000
    config.batch_size = 16
    config.grad_accum_steps = 1
    config.stage = stage
    config.init_from = ml_collections.ConfigDict(
        {"vision": "", "decoder": "", "mllm": "", "workdir": ""}
    )

    config.model = ml_collections.ConfigDict()
    config.model.dtype = "float32"
    config.model.vit = {}
    config.model.projector = dict(compress=False)
    config.model.decoder = {}
    config.model.attention = attention
    config.model.gaze = dict(
        top_k=4, routing="per_head", implementation="xla", descriptor_keys="post_rope"
    )
    config.model.num_context_tokens = 4 if attention == "gaze" else 0
    config.model.region_size = (6, 6, 1)
    # The ViT encodes unit slots this many per sample at a time, skipping slots that no sample
    # of the batch fills (0: every slot; MultimodalConfig.units_per_encode).
    config.model.units_per_encode = 0
    # K falls from "all regions" to model.gaze.top_k over decay_fraction of training, held on a
    # few levels (each distinct K compiles once).
    config.progressive_top_k = dict(decay_fraction=0.5, levels=4)

    config.data = ml_collections.ConfigDict()
    config.data.name = "synthetic"
    config.data.synthetic = {}
    config.data.jsonl = dict(
        train="", eval="", image_root="", video_root="", max_frames=8, max_skips=100
    )
    config.data.tokenizer = ""  # tokenizer.json for jsonl data; synthetic uses the built-in one
    config.data.pad_token = "<|endoftext|>"
    config.data.system_prompt = "You are a helpful assistant."
    config.data.skip_bad_samples = False
    config.data.buckets = {}

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.weight_decay = 0.01
    config.optim.b1 = 0.9
    config.optim.b2 = 0.95
    config.optim.clip_norm = 1.0
    # Stage 1 trains the projector and the context tokens; stage 2 everything.
    # Tuples, so the command line can set them (ml_collections overrides no list), e.g.
    # --config.optim.lr_multipliers='(("vision/.*", 0.1),)'.
    config.optim.trainable = (".*",) if stage == 2 else ("projector/.*", "context_tokens")
    config.optim.lr_multipliers = ()  # (regex, multiplier) pairs; 0 freezes

    # A tuple, so the command line can set it: --config.mesh.shape='(2,1,2,2)'.
    config.mesh = ml_collections.ConfigDict({"shape": (-1, 1, 1, 1)})
    config.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES  # (logical name, mesh axes) pairs
    # jax.distributed: empty address / -1 counts mean auto-detect (TPU pods, SLURM, ...).
    config.distributed = dict(
        enabled=False, coordinator_address="", num_processes=-1, process_id=-1
    )

    config.log_every_steps = 25
    config.checkpoint_every_steps = 200
    config.keep_checkpoints = 2
    config.eval_every_steps = 500
    config.eval_examples = 256
    return config


FREE = None  # a section whose keys are checked elsewhere (dataclasses) or are user-defined

SCHEMA: dict = {
    "seed": int,
    "total_steps": int,
    "batch_size": int,
    "grad_accum_steps": int,
    "stage": int,
    "init_from": {"vision": str, "decoder": str, "mllm": str, "workdir": str},
    "model": {
        "dtype": str,
        "vit": FREE,
        "projector": FREE,
        "decoder": FREE,
        "attention": str,
        "gaze": {"top_k": int, "routing": str, "implementation": str, "descriptor_keys": str},
        "num_context_tokens": int,
        "region_size": FREE,
        "units_per_encode": int,
    },
    "progressive_top_k": {"decay_fraction": float, "levels": int},
    "data": {
        "name": str,
        "synthetic": FREE,
        "jsonl": {
            "train": str,
            "eval": str,
            "image_root": str,
            "video_root": str,
            "max_frames": int,
            "max_skips": int,
        },
        "tokenizer": str,
        "pad_token": str,
        "buckets": FREE,
        "system_prompt": str,
        "skip_bad_samples": bool,
    },
    "optim": {
        "learning_rate": float,
        "warmup_steps": int,
        "weight_decay": float,
        "b1": float,
        "b2": float,
        "clip_norm": float,
        "trainable": FREE,
        "lr_multipliers": FREE,
    },
    "mesh": {"shape": FREE},
    "logical_axis_rules": FREE,
    "distributed": {
        "enabled": bool,
        "coordinator_address": str,
        "num_processes": int,
        "process_id": int,
    },
    "log_every_steps": int,
    "checkpoint_every_steps": int,
    "keep_checkpoints": int,
    "eval_every_steps": int,
    "eval_examples": int,
}


def _check_keys(config: Mapping, schema: Mapping, prefix: str) -> None:
    unknown = sorted(set(config) - set(schema))
    if unknown:
        raise ConfigError(f"unknown config key(s): {[prefix + k for k in unknown]}")
    missing = sorted(set(schema) - set(config))
    if missing:
        raise ConfigError(f"missing config key(s): {[prefix + k for k in missing]}")
    for key, expected in schema.items():
        value = config[key]
        if isinstance(expected, dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config.{prefix}{key} must be a section, got {value!r}")
            _check_keys(value, expected, f"{prefix}{key}.")
        elif expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        elif expected is not FREE and not isinstance(value, expected):
            raise ConfigError(f"config.{prefix}{key} must be {expected.__name__}, got {value!r}")


def _check_top_k_fits_buckets(top_k: int, buckets: Mapping[str, Mapping]) -> None:
    """K must not exceed the regions a sample of the largest bucket holds: a larger K would train
    (and log) a K that no sample has, i.e. dense attention under gaze's name."""
    sizes = [(b["num_regions"], name) for name, b in buckets.items() if "num_regions" in b]
    if not sizes:
        return
    most, name = max(sizes)
    if top_k > most:
        raise ConfigError(
            f"config.model.gaze.top_k={top_k} is more than the {most} regions a training "
            f"sample holds (config.data.buckets.{name}.num_regions); K={most} already selects "
            "every region"
        )


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` naming the key(s) at fault."""
    _check_keys(config.to_dict(), SCHEMA, "")
    positive = [
        "total_steps",
        "batch_size",
        "grad_accum_steps",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "eval_every_steps",
    ]
    for key in positive:
        if config[key] < 1:
            raise ConfigError(f"config.{key} must be >= 1, got {config[key]}")
    if config.stage not in (1, 2):
        raise ConfigError(f"config.stage must be 1 or 2, got {config.stage}")
    if config.stage == 1 and ".*" in config.optim.trainable:
        raise ConfigError(
            "config.stage=1 trains the projector and context tokens only, but "
            "config.optim.trainable contains '.*'"
        )
    if config.batch_size % config.grad_accum_steps:
        raise ConfigError(
            f"config.batch_size ({config.batch_size}) must be divisible by "
            f"config.grad_accum_steps ({config.grad_accum_steps})"
        )
    if config.model.attention not in ("dense", "gaze"):
        raise ConfigError(
            f"config.model.attention must be dense or gaze, got {config.model.attention!r}"
        )
    if config.model.attention == "gaze" and config.model.gaze.top_k < 1:
        raise ConfigError(f"config.model.gaze.top_k must be >= 1, got {config.model.gaze.top_k}")
    if config.model.attention == "gaze":
        _check_top_k_fits_buckets(config.model.gaze.top_k, config.data.buckets.to_dict())
    if not 0.0 <= config.progressive_top_k.decay_fraction <= 1.0:
        raise ConfigError("config.progressive_top_k.decay_fraction must be in [0, 1]")
    if config.data.name not in ("synthetic", "jsonl"):
        raise ConfigError(f"config.data.name must be synthetic or jsonl, got {config.data.name!r}")
    if config.data.name == "jsonl":
        for key in ("train", "eval", "image_root"):
            if not config.data.jsonl[key]:
                raise ConfigError(f"config.data.jsonl.{key} must be set for data.name=jsonl")
        if not config.data.tokenizer:
            raise ConfigError("config.data.tokenizer (a tokenizer.json) must be set for jsonl")
        if "all" not in config.data.buckets:
            raise ConfigError(
                "config.data.buckets.all (length, max_units, num_regions) must be "
                "set for data.name=jsonl"
            )
    if len(config.mesh.shape) != 4 or list(config.mesh.shape).count(-1) > 1:
        raise ConfigError(
            "config.mesh.shape must have 4 entries (data, fsdp, tensor, sequence) "
            "with at most one -1"
        )

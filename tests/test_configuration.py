"""Config files take only the variants they know, and a gaze K no training sample can have is
refused at start-up."""

from __future__ import annotations

import pytest
from absl import flags
from ml_collections import config_flags

from configs import cambrian_4b_image, cambrian_7b_video, synthetic
from gazejax.configuration import ConfigError, validate_config

KNOWN = "known: stage=1|2, attention=dense|gaze, runlocal"


@pytest.mark.parametrize(
    "module,variant",
    [
        (synthetic, "runlokal"),  # a typo once built the full 2400-step default
        (synthetic, "attention=gaze,stage=3"),
        (synthetic, "runlocal=0"),  # a flag takes no value
        (cambrian_7b_video, "compress"),  # video always compresses
    ],
)
def test_unknown_variants_are_refused_listing_the_known_ones(module, variant):
    with pytest.raises(ConfigError, match="unknown config variant") as error:
        module.get_config(variant)
    assert KNOWN in str(error.value)


def test_known_variants_build():
    assert synthetic.get_config("runlocal,attention=gaze").total_steps == 6
    assert synthetic.get_config("stage=1").stage == 1
    assert cambrian_4b_image.get_config("stage=2,compress").model.region_size == (3, 3, 1)


def test_top_k_above_the_regions_of_every_training_sample_is_refused():
    config = synthetic.get_config("attention=gaze")  # images of 9 regions, videos of 36
    config.model.gaze.top_k = 36  # every region of a video: allowed
    validate_config(config)
    config.model.gaze.top_k = 50
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert str(error.value) == (
        "config.model.gaze.top_k=50 is more than the 36 regions a training sample holds "
        "(config.data.buckets.video.num_regions); K=36 already selects every region"
    )


def test_sequence_keys_are_overridable_from_the_command_line():
    """Parameter groups and sharding rules are set the way a user sets them: flags on the
    command line (ml_collections refuses to override a list)."""
    argv = [
        "train",
        f"--config={synthetic.__file__}:attention=gaze",
        "--config.optim.trainable=('vision/.*', 'projector/.*')",
        "--config.optim.lr_multipliers=(('vision/.*', 0.1), ('projector/.*', 2))",
        "--config.logical_axis_rules=(('batch', ('data', 'fsdp')), ('heads', 'tensor'))",
    ]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    config = values.config
    assert tuple(config.optim.trainable) == ("vision/.*", "projector/.*")
    assert dict(config.optim.lr_multipliers) == {"vision/.*": 0.1, "projector/.*": 2}
    assert config.logical_axis_rules[0] == ("batch", ("data", "fsdp"))
    validate_config(config)

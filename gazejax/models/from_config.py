"""Builds the multimodal model's dataclass configs from an ``ml_collections`` model section.

model.vit        = {variant, **ViTConfig overrides}
model.projector  = {compress}
model.decoder    = {DecoderConfig fields}        (hidden_size also sizes the projector)
model.attention  = "dense" | "gaze";  model.gaze = {top_k, routing, implementation,
                                                    descriptor_keys}
model.num_context_tokens, model.region_size, model.units_per_encode, model.dtype
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from gazejax.models.decoder import DecoderConfig
from gazejax.models.mllm import MultimodalConfig
from gazejax.models.projector import ProjectorConfig
from gazejax.models.vit import vit_config


def _plain(section) -> dict:
    return dict(section.to_dict() if hasattr(section, "to_dict") else section)


def multimodal_config(model: Mapping) -> MultimodalConfig:
    """The :class:`MultimodalConfig` described by the ``model`` section of a training config.

    Raises:
      ValueError / TypeError: naming the offending key (the dataclasses validate themselves).
    """
    model = _plain(model)
    dtype = jnp.dtype(model.get("dtype", "float32"))
    vit_section = _plain(model["vit"])
    vit = vit_config(vit_section.pop("variant"), dtype=dtype, **vit_section)
    gaze = _plain(model.get("gaze", {}))
    decoder = DecoderConfig(
        **_plain(model["decoder"]),
        dtype=dtype,
        attention=model.get("attention", "dense"),
        gaze_top_k=gaze.get("top_k", 1),
        gaze_routing=gaze.get("routing", "per_head"),
        gaze_implementation=gaze.get("implementation", "xla"),
        gaze_descriptor_keys=gaze.get("descriptor_keys", "post_rope"),
    )
    projector = ProjectorConfig(
        vision_width=vit.width,
        hidden_size=decoder.hidden_size,
        dtype=dtype,
        **_plain(model.get("projector", {})),
    )
    return MultimodalConfig(
        vit=vit,
        projector=projector,
        decoder=decoder,
        num_context_tokens=model.get("num_context_tokens", 4),
        region_size=tuple(model.get("region_size", (6, 6, 1))),
        units_per_encode=model.get("units_per_encode", 0),
    )

"""What the generic converter needs to know about one model family."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax

from gazejax.convert.mapping import Rule, identity


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family (Qwen decoder, SigLIP ViT, ...) as the converter sees it.

    Attributes:
      name: short name, e.g. ``"qwen"``.
      model_types: the Hugging Face ``config.json`` ``model_type`` values this family reads.
      module_type: the gazejax Flax module class; ``save_hf`` dispatches on it.
      build: HF ``config.json`` dict -> gazejax module.
      rules: (module, HF config dict) -> the parameter mapping. The HF config tells, e.g., whether
        the tensors carry a ``vision_model.`` prefix.
      ignore: HF config dict -> regex of checkpoint keys that may be present but are not loaded
        (e.g. the text tower of a two-tower SigLIP), or ``None``.
      example_inputs: module -> abstract positional inputs for ``jax.eval_shape(module.init, ...)``.
      hf_config: module -> the ``config.json`` dict that ``transformers`` loads.
      rename: a stored checkpoint key -> the key the rules use (one spelling of keys that
        different writers prefix differently).
      carried: ``config.json`` entries the module does not hold but its ``config.json`` needs
        (a multimodal model's ``image_token_index``): copied through HF -> gazejax -> HF.
    """

    name: str
    model_types: tuple[str, ...]
    module_type: type[nn.Module]
    build: Callable[[dict], nn.Module]
    rules: Callable[[nn.Module, dict], list[Rule]]
    ignore: Callable[[dict], str | None]
    example_inputs: Callable[[nn.Module], tuple[jax.ShapeDtypeStruct, ...]]
    hf_config: Callable[[nn.Module], dict]
    rename: Callable[[str], str] = identity
    carried: tuple[str, ...] = ()

"""Inference with a trained model: restore a workdir, build a prompt, decode, probe, draw.

- :mod:`~gazejax.inference.checkpoints`: :func:`load_checkpoint` (config, parameters,
  tokenizer of a training workdir), :func:`with_attention` (dense or gaze, same weights).
- :mod:`~gazejax.inference.prompts`: the training template as a packed :class:`Prompt`.
- :mod:`~gazejax.inference.decode`: prefill + jitted decode steps (:func:`generate_answer` for
  the multimodal model, :func:`generate_token_ids` for the text-only decoder).
- :mod:`~gazejax.inference.sequence_parallel`: a prompt laid out for a KV cache split along its
  sequence over a mesh (``generate_answer(mesh=...)``).
- :mod:`~gazejax.inference.sampling`: greedy / temperature / top-p choice of the next token.
- :mod:`~gazejax.inference.probes`: selected regions and attention probabilities.
- :mod:`~gazejax.inference.maps`: routing and attention map PNGs.
"""

from gazejax.inference.checkpoints import Checkpoint, load_checkpoint, with_attention
from gazejax.inference.decode import GenerationResult, generate_answer, generate_token_ids
from gazejax.inference.maps import draw_attention_map, draw_routing_map
from gazejax.inference.probes import attention_to_visual
from gazejax.inference.prompts import Prompt, build_prompt, load_visuals, pack_prompt, prompt_items
from gazejax.inference.sampling import sample_next_token

__all__ = [
    "Checkpoint",
    "GenerationResult",
    "Prompt",
    "attention_to_visual",
    "build_prompt",
    "draw_attention_map",
    "draw_routing_map",
    "generate_answer",
    "generate_token_ids",
    "load_checkpoint",
    "load_visuals",
    "pack_prompt",
    "prompt_items",
    "sample_next_token",
    "with_attention",
]

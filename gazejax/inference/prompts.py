"""Prompts for generation: the training template (ChatML, the training system prompt; one
``<image>`` placeholder per image and one per video, before the question, unless the question
places them itself), tokenized as training does and packed (batch 1) for the decode loop."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import tokenizers

from gazejax.data.images import read_image
from gazejax.data.packing import Text, Visual, interleave, pack_batch
from gazejax.data.template import DEFAULT_SYSTEM_PROMPT, chatml_pieces
from gazejax.data.video import read_video
from gazejax.data.vocab import IMAGE_TOKEN
from gazejax.gaze.inputs import MultimodalInputs
from gazejax.models.mllm import MultimodalConfig
from kernels.gaze_attention import TokenKind


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A packed prompt (batch 1) and what generation needs to know about it.

    Attributes:
      inputs: the model inputs, ``length`` slots (the prompt, then padding).
      items: the text spans and visuals it was packed from (to append generated text).
      last_slot: storage slot of the last prompt token (its logits predict the first token).
      next_position: position id of the first generated token.
      num_unrouted: text + context tokens of the prompt (a gaze decode bound).
      length: padded slot count (a static shape: prompts of one length compile once).
    """

    inputs: MultimodalInputs
    items: list
    last_slot: int
    next_position: int
    num_unrouted: int
    length: int

    @property
    def num_regions(self) -> int:
        """Regions of the prompt's images / frames (the padding's empty regions not counted)."""
        return int((np.asarray(self.inputs.regions.length) > 0).sum())


def prompt_items(
    tokenizer: tokenizers.Tokenizer,
    question: str,
    visuals: Sequence[np.ndarray],
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> list[Text | Visual]:
    """A one-turn ChatML prompt, tokenized exactly as training does, up to ``assistant\\n``.

    Args:
      tokenizer: the training tokenizer; it must know ``<image>``.
      question: the user's text; without ``<image>`` placeholders, one per visual is put first
        (``"<image>\\n" * n + question``, as the training data).
      visuals: float32 ``[frames, H, W, 3]`` per image (one frame) or video, preprocessed.
      system_prompt: the training system prompt.
    """
    if IMAGE_TOKEN not in question:
        question = f"{IMAGE_TOKEN}\n" * len(visuals) + question
    conversation = [{"from": "human", "value": question}, {"from": "gpt", "value": ""}]
    pieces = chatml_pieces(conversation, system_prompt)[:-3]  # up to "<|im_start|>assistant\n"
    ids = [i for text, _ in pieces for i in tokenizer.encode(text, add_special_tokens=False).ids]
    placeholder = tokenizer.token_to_id(IMAGE_TOKEN)
    if placeholder is None:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token")
    return interleave(
        np.asarray(ids, np.int32), placeholder, [Visual(np.asarray(v)) for v in visuals]
    )


def build_prompt(
    config: MultimodalConfig,
    tokenizer: tokenizers.Tokenizer,
    question: str,
    visuals: Sequence[np.ndarray],
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    pad_multiple: int = 64,
) -> Prompt:
    """:func:`prompt_items` packed by :func:`pack_prompt` (``config``: the model's; the slot
    count is rounded up to a multiple of ``pad_multiple``, so prompts compile less often)."""
    items = prompt_items(tokenizer, question, visuals, system_prompt)
    return pack_prompt(config, items, pad_multiple)


def pack_prompt(config: MultimodalConfig, items: list, pad_multiple: int = 1) -> Prompt:
    """Packs text spans and visuals (batch 1) into ``ceil(slots / pad_multiple)`` slots."""
    geometry = config.geometry
    units = sum(len(x.frames) for x in items if isinstance(x, Visual))
    text = sum(len(x.ids) for x in items if isinstance(x, Text))
    # A generous upper bound: every unit's slots, and room for padded regions.
    needed = text + units * (geometry.slots_per_unit + geometry.tokens_per_unit)
    inputs, _ = pack_batch(
        [items],
        geometry,
        length=needed,
        max_units=max(units, 1),
        num_regions=max(units * geometry.tokens_per_unit, 1),
    )
    kind = np.asarray(inputs.meta.kind[0])
    position = np.asarray(inputs.meta.position[0])
    valid = np.flatnonzero(kind != TokenKind.PADDING)
    used = int(valid.max()) + 1
    regions = int(np.asarray(inputs.meta.region[0]).max()) + 1
    length = math.ceil(used / pad_multiple) * pad_multiple
    inputs, _ = pack_batch(
        [items], geometry, length=length, max_units=max(units, 1), num_regions=max(regions, 1)
    )
    return Prompt(
        inputs=inputs,
        items=list(items),
        last_slot=int(valid[np.argmax(position[valid])]),
        next_position=int(position.max()) + 1,
        num_unrouted=int(np.isin(kind, (TokenKind.TEXT, TokenKind.CONTEXT)).sum()),
        length=length,
    )


def load_visuals(
    images: Sequence[str] = (),
    videos: Sequence[str] = (),
    *,
    image_size: int,
    max_frames: int = 8,
    fps: float = 1.0,
) -> list[np.ndarray]:
    """Preprocessed ``[frames, H, W, 3]`` arrays: the images, then the videos (file or folder).

    Raises:
      DataError: a missing, unreadable or corrupt file (its path first in the message).
    """
    out = [read_image(path, image_size)[None] for path in images]
    for path in videos:
        frames, _ = read_video(path, image_size=image_size, max_frames=max_frames, fps=fps)
        out.append(frames)
    return out

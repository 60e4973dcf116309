"""The ChatML conversation template (Qwen), the same at training and at evaluation.

A LLaVA / Cambrian conversation ``[{"from": "human"|"gpt", "value": ...}, ...]`` becomes

    <|im_start|>system\\n{system prompt}<|im_end|>\\n
    <|im_start|>user\\n{human turn}<|im_end|>\\n
    <|im_start|>assistant\\n{gpt turn}<|im_end|>\\n ...

The loss covers each assistant turn's text and its closing ``<|im_end|>``, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tokenizers

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = {"human": "user", "gpt": "assistant"}
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class ConversationError(ValueError):
    """A conversation that does not follow the human / gpt turn structure."""


def chatml_pieces(
    conversation: Sequence[Mapping[str, str]], system_prompt: str = DEFAULT_SYSTEM_PROMPT
) -> list[tuple[str, bool]]:
    """The conversation as ``(text, supervised)`` pieces in order.

    Raises:
      ConversationError: turns that are not dicts with ``from`` in {human, gpt} and a string
        ``value``, turns that do not alternate starting with ``human``, or no ``gpt`` turn.
    """
    pieces = [(f"{IM_START}system\n{system_prompt}{IM_END}\n", False)]
    expected = "human"
    for index, turn in enumerate(conversation):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise ConversationError(f"turn {index} is not {{'from': ..., 'value': str}}: {turn!r}")
        role = turn.get("from")
        if role not in ROLES:
            raise ConversationError(f"turn {index} has unknown role {role!r} (human or gpt)")
        if role != expected:
            raise ConversationError(f"turn {index} is {role!r}, expected {expected!r}")
        expected = "gpt" if role == "human" else "human"
        pieces.append((f"{IM_START}{ROLES[role]}\n", False))
        if role == "gpt":
            pieces += [(turn["value"], True), (IM_END, True), ("\n", False)]
        else:
            pieces.append((f"{turn['value']}{IM_END}\n", False))
    if not any(supervised for _, supervised in pieces):
        raise ConversationError("conversation has no assistant (gpt) turn")
    return pieces


def prompt_text(question: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The text before an answer: system, one user turn, and the assistant header."""
    return (
        f"{IM_START}system\n{system_prompt}{IM_END}\n{IM_START}user\n{question}{IM_END}\n"
        f"{IM_START}assistant\n"
    )


def tokenize_conversation(
    conversation: Sequence[Mapping[str, str]],
    tokenizer: tokenizers.Tokenizer,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``[n]`` and next-token targets ``[n]`` (-1 where there is no loss)."""
    ids, supervised = [], []
    for text, is_target in chatml_pieces(conversation, system_prompt):
        piece = tokenizer.encode(text, add_special_tokens=False).ids
        ids += piece
        supervised += [is_target] * len(piece)
    ids = np.asarray(ids, np.int32)
    supervised = np.asarray(supervised, bool)
    targets = np.full(ids.shape, -1, np.int32)
    targets[:-1] = np.where(supervised[1:], ids[1:], -1)
    return ids, targets

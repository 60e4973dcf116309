"""From an example (conversation + images / videos) to text spans with targets and visuals.

The synthetic set and the real JSON/JSONL data share this path, and so one template, one
tokenization and one packing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tokenizers

from gazejax.data.packing import Text, Visual, interleave
from gazejax.data.template import DEFAULT_SYSTEM_PROMPT, tokenize_conversation


def example_items(
    conversations: Sequence[Mapping[str, str]],
    visuals: Sequence[np.ndarray],
    tokenizer: tokenizers.Tokenizer,
    placeholder: str = "<image>",
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> list[Text | Visual]:
    """One example as text spans (with targets) and visual items, in order.

    ``visuals[i]`` (``[frames, H, W, 3]``: one frame for an image, several for a video) goes to
    the ``i``-th placeholder of the conversation.
    """
    ids, targets = tokenize_conversation(conversations, tokenizer, system_prompt)
    placeholder_id = tokenizer.token_to_id(placeholder)
    if placeholder_id is None:
        raise ValueError(f"the tokenizer has no {placeholder!r} token")
    return interleave(ids, placeholder_id, [Visual(np.asarray(v)) for v in visuals], targets)

"""The ChatML template: loss on assistant turns only; malformed conversations are named."""

from __future__ import annotations

import numpy as np
import pytest

from gazejax.data.packing import Text, Visual
from gazejax.data.pipeline import example_items
from gazejax.data.template import ConversationError, tokenize_conversation
from gazejax.data.vocab import build_tokenizer

TOKENIZER = build_tokenizer()
CONVERSATION = [
    {"from": "human", "value": "<image>\nwhat color is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "how many squares?"},
    {"from": "gpt", "value": "two"},
]


def test_targets_are_the_assistant_answers_and_their_end_tokens():
    ids, targets = tokenize_conversation(CONVERSATION, TOKENIZER)
    text = TOKENIZER.decode(ids.tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert "<|im_start|>assistant\nred<|im_end|>\n<|im_start|>user\nhow many" in text
    supervised = [TOKENIZER.id_to_token(int(t)) for t in targets if t >= 0]
    assert supervised == ["red", "<|im_end|>", "two", "<|im_end|>"]
    np.testing.assert_array_equal(targets[:-1][targets[:-1] >= 0], ids[1:][targets[:-1] >= 0])


@pytest.mark.parametrize(
    "conversation,message",
    [
        ([{"from": "human", "value": "hi"}], "no assistant"),
        ([{"from": "gpt", "value": "hi"}], "expected 'human'"),
        ([{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}], "unknown role"),
        ([{"from": "human", "value": 3}], "turn 0"),
        (["just a string"], "turn 0"),
    ],
)
def test_malformed_conversations_are_named(conversation, message):
    with pytest.raises(ConversationError, match=message):
        tokenize_conversation(conversation, TOKENIZER)


def test_example_items_place_the_image_and_keep_targets():
    image = np.random.default_rng(0).uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
    items = example_items(CONVERSATION, [image], TOKENIZER)
    assert [type(x) for x in items] == [Text, Visual, Text]
    assert items[1].frames is not None and items[1].frames.shape == (1, 8, 8, 3)
    assert (items[0].targets == -1).all()
    assert (items[2].targets >= 0).sum() == 4
    with pytest.raises(ValueError, match="1 placeholder"):
        example_items(CONVERSATION, [image, image], TOKENIZER)

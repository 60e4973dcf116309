"""Deterministic, resumable batches: batch ``s`` is a pure function of the step.

Each host packs its own slice of the global batch: host ``p`` of ``P`` takes examples
``s·B + p·B/P ... s·B + (p+1)·B/P - 1`` of the (already shuffled, random-access) example
sequence. Restarting at step ``s`` therefore reproduces the data exactly, with no iterator state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import tokenizers

from gazejax.data.packing import Text, Visual, pack_batch
from gazejax.data.pipeline import example_items
from gazejax.data.synthetic import SyntheticConfig, SyntheticVQA, to_conversation
from gazejax.models.mllm import MultimodalConfig, MultimodalInputs

Example = tuple[list[Text | Visual], Mapping[str, Any]]  # items, and info for evaluation


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """Static per-sample shapes: slots, visual units and regions."""

    length: int
    max_units: int
    num_regions: int


class Batches:
    """``batches(step) -> (inputs, targets, infos)`` for this host's share of the batch."""

    def __init__(
        self,
        example: Callable[[int], Example],
        global_batch_size: int,
        model_config: MultimodalConfig,
        shape: BatchShape,
        pad_id: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if global_batch_size % process_count:
            raise ValueError(
                f"batch_size ({global_batch_size}) must be divisible by the number of "
                f"processes ({process_count})"
            )
        self.example = example
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.model_config = model_config
        self.shape = shape
        self.pad_id = pad_id
        self.offset = process_index * self.local_batch_size

    def indices(self, step: int) -> range:
        start = step * self.global_batch_size + self.offset
        return range(start, start + self.local_batch_size)

    def __call__(self, step: int) -> tuple[MultimodalInputs, jax.Array, list[Mapping[str, Any]]]:
        examples = [self.example(i) for i in self.indices(step)]
        inputs, targets = pack_batch(
            [items for items, _ in examples],
            self.model_config,
            self.shape.length,
            self.shape.max_units,
            self.shape.num_regions,
            self.pad_id,
        )
        return inputs, targets, [info for _, info in examples]


def synthetic_examples(
    config: Mapping[str, Any],
    split: str,
    seed: int,
    tokenizer: tokenizers.Tokenizer,
    system_prompt: str,
    size: int = 2**31 - 1,
) -> Callable[[int], Example]:
    """Example ``i`` of the synthetic set's ``split`` as packed-ready items."""
    dataset = SyntheticVQA(SyntheticConfig(**dict(config), seed=seed), split=split, size=size)

    def example(index: int) -> Example:
        record = dataset[index % len(dataset)]
        conversation = to_conversation(record)["conversations"]
        items = example_items(conversation, [record["units"]], tokenizer, "<image>", system_prompt)
        return items, {"task": record["task"], "family": record["family"]}

    return example

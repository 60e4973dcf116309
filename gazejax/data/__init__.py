"""Data: the synthetic visual-QA set, the built-in tokenizer, LLaVA/Cambrian JSON(L) sources,
the ChatML template, and packing into static-shape batches."""

from gazejax.data.records import DataError
from gazejax.data.sources import ConversationSource, check_length, host_dataset, to_items
from gazejax.data.synthetic import TASKS, SyntheticConfig, SyntheticVQA, to_conversation
from gazejax.data.vocab import build_tokenizer, save

__all__ = [
    "TASKS",
    "ConversationSource",
    "DataError",
    "SyntheticConfig",
    "SyntheticVQA",
    "build_tokenizer",
    "check_length",
    "host_dataset",
    "save",
    "to_conversation",
    "to_items",
]

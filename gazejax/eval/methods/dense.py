"""``dense``: dense attention with the checkpoint's weights; every answer query reads every
visual token (``f = 1``). A gaze checkpoint's context tokens stay in the sequence (text queries
read them, as in gaze)."""

from __future__ import annotations

import dataclasses

from gazejax.eval.methods.base import Method, Runner, plain_logits
from gazejax.inference.checkpoints import with_attention
from gazejax.models.mllm import MultimodalConfig, MultimodalModel


@dataclasses.dataclass(frozen=True)
class Dense(Method):
    name = "dense"
    color = (0, 0, 0)

    def runner(self, base: MultimodalConfig) -> Runner:
        config = with_attention(base, "dense")
        return Runner(self, config, plain_logits(MultimodalModel(config)))

    def note(self, base: MultimodalConfig) -> str | None:
        if not base.num_context_tokens:
            return None
        return (
            f"dense keeps the checkpoint's {base.num_context_tokens} context tokens per unit "
            "(text queries read them, as in gaze)"
        )

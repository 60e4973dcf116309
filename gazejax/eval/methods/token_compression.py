"""``token_compression``: the checkpoint's 3×3 stride-2 projector convolution, evaluated dense;
only when ``model.projector.compress`` is set (else skipped with a note); its budget is fixed by
the convolution (relative to the uncompressed grid)."""

from __future__ import annotations

import dataclasses

from gazejax.eval.methods.dense import Dense
from gazejax.models.mllm import MultimodalConfig


@dataclasses.dataclass(frozen=True)
class TokenCompression(Dense):
    name = "token_compression"
    color = (148, 103, 189)

    def note(self, base: MultimodalConfig) -> str | None:
        return None

    def skip_reason(self, base: MultimodalConfig) -> str | None:
        if base.projector.compress:
            return None
        return "token_compression skipped: the checkpoint's projector has no compress conv"

    def dense_grid(self, config: MultimodalConfig) -> tuple[int, int]:
        return config.vit.grid, config.vit.grid

"""``gaze@f``: gaze attention at ``K = max(1, round(f·R))`` regions, ``R`` the regions of a
sample of the batch's bucket (9 for a 6×6 image in 2×2 regions, 36 for a 4-frame video); the
visual entries read are ``≤ K·m``. Every text query routes (the question's too), as in training.
A checkpoint trained dense has no context tokens; gaze then runs without them (noted)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from gazejax.eval.methods.base import Method, Runner, plain_logits
from gazejax.inference.checkpoints import with_attention
from gazejax.models.mllm import MultimodalConfig, MultimodalModel


def gaze_top_k(budget: float, num_regions: int) -> int:
    """K for a budget over ``num_regions`` regions: ``max(1, round(f·R))``, at most ``R``
    (round half up)."""
    return min(max(1, math.floor(budget * num_regions + 0.5)), max(num_regions, 1))


@dataclasses.dataclass(frozen=True)
class Gaze(Method):
    name = "gaze"
    takes_budget = True
    color = (214, 39, 40)

    def runner(self, base: MultimodalConfig) -> Runner:
        config = with_attention(base, "gaze")
        return Runner(self, config, plain_logits(MultimodalModel(config)))

    def note(self, base: MultimodalConfig) -> str | None:
        if base.num_context_tokens:
            return None
        return (
            "gaze on a checkpoint without context tokens (num_context_tokens = 0, e.g. trained "
            "dense): gaze runs without them"
        )

    def top_k(self, num_regions: int) -> int:
        return gaze_top_k(self.budget, num_regions)

    def visual_kv(self, num_visual: np.ndarray, top_k: int | None, region_size: int) -> np.ndarray:
        return np.minimum(top_k * region_size, num_visual)

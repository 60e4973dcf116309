"""``blind``: the checkpoint answering without the picture. Every text query (the question, the
template and the answer) reads only text entries: no visual and no context entries, so nothing
of the pixels reaches an answer (visual KV 0). Its score is what the weights get from the text
alone (the question and, in a conversation, the earlier turns); they were never trained to
answer without looking, so it can fall below a plain guess (the synthetic benchmark's majority
answer). A method's score measures looking only by how far it stands above both."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from gazejax.eval.methods.base import Method, Runner, masked_logits
from gazejax.gaze.inputs import MultimodalInputs
from gazejax.inference.checkpoints import with_attention
from gazejax.models.decoder import dense_visibility
from gazejax.models.mllm import MultimodalConfig, MultimodalModel
from kernels.gaze_attention import TokenKind


def blind_mask(inputs: MultimodalInputs) -> jax.Array:
    """bool ``[batch, length, length]``: dense visibility, less every visual and context entry
    for every text query."""
    meta = inputs.meta
    pictured = (meta.kind == TokenKind.VISUAL) | (meta.kind == TokenKind.CONTEXT)
    text = meta.kind == TokenKind.TEXT
    return dense_visibility(meta, meta) & ~(text[:, :, None] & pictured[:, None, :])


@dataclasses.dataclass(frozen=True)
class Blind(Method):
    name = "blind"
    color = (148, 103, 189)
    reads_context = False

    def runner(self, base: MultimodalConfig) -> Runner:
        config = with_attention(base, "dense")
        model = MultimodalModel(config)

        def logits(params, inputs, targets, top_k):
            del targets, top_k
            mask = blind_mask(inputs)
            return masked_logits(model, params, inputs, lambda layer: mask)

        return Runner(self, config, logits)

    def visual_kv(self, num_visual: np.ndarray, top_k: int | None, region_size: int) -> np.ndarray:
        return np.zeros_like(num_visual)

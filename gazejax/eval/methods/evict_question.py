"""``evict_question@f`` (InfiniPot-V / HERMES-style, query-guided eviction): the *prefill* is
every slot before the first answer query; at its end each layer scores the visual entries by the
dense attention weight the question's queries give them (text slots after the first visual token
and before the first answer query, i.e. the question and the template up to ``assistant``),
averaged over those queries and all heads; per layer and sample it keeps the
``max(1, round(f·n))`` best of its ``n`` visual entries (shared by the heads). The eviction
happens **once**: every later query (the answer, and in a conversation every later question
and answer, which a real system would append to the reduced cache) attends densely to all text
and context entries and the kept visual entries only; prefill queries are unchanged (dense).
Visual entries that come after the first answer query (a later turn's image) are not evicted.
Implemented exactly with two forwards: a dense one capturing queries and keys
(:func:`~gazejax.inference.probes.rotated_queries_keys`), then one with a per-layer mask."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gazejax.eval.methods.base import Method, Runner, masked_logits
from gazejax.gaze.inputs import MultimodalInputs
from gazejax.inference.checkpoints import with_attention
from gazejax.inference.probes import attention_probabilities, rotated_queries_keys
from gazejax.models.decoder import dense_visibility
from gazejax.models.mllm import MultimodalConfig, MultimodalModel
from kernels.gaze_attention import TokenKind


def kept_count(budget: float, num_visual: jax.Array) -> jax.Array:
    """Visual entries a layer keeps of ``num_visual`` (any shape): ``max(1, round(f·n))``."""
    return jnp.clip(jnp.floor(budget * num_visual + 0.5), 1, num_visual)


def evict_masks(
    model: MultimodalModel, params, inputs: MultimodalInputs, targets: jax.Array, budget: float
) -> tuple[jax.Array, jax.Array]:
    """Per-layer dense masks after question-guided eviction (``model`` dense; see the module
    docstring).

    Returns:
      bool ``[num_layers, batch, length, length]`` masks, and bool ``[num_layers, batch,
      length]``: the prefill's visual entries kept per layer.
    """
    meta = inputs.meta
    base = dense_visibility(meta, meta)  # [b, q, kv]
    big = jnp.iinfo(jnp.int32).max
    answer = (targets >= 0) & (meta.position >= 0)
    first_decode = jnp.min(jnp.where(answer, meta.position, big), axis=-1, keepdims=True)
    decode = meta.position >= first_decode  # every query after the eviction
    visual = (meta.kind == TokenKind.VISUAL) & (meta.position < first_decode)  # evictable
    first_visual = jnp.min(jnp.where(visual, meta.position, big), axis=-1, keepdims=True)
    scorer = (
        (meta.kind == TokenKind.TEXT)
        & (meta.position > first_visual)
        & (meta.position < first_decode)
    )
    keep_n = kept_count(budget, visual.sum(-1))[:, None]
    num_heads = model.config.decoder.num_heads
    layers, _ = rotated_queries_keys(model, params, inputs)
    masks, kept = [], []
    for query, key in layers:
        probs = attention_probabilities(query, key, base[:, None])  # [b, h, q, kv]
        rows = scorer[:, None, :, None].astype(jnp.float32)  # [b, 1, q, 1]
        weight = (probs * rows).sum((1, 2)) / jnp.maximum(rows.sum((1, 2)) * num_heads, 1)
        score = jnp.where(visual, weight, -jnp.inf)
        rank = jnp.argsort(jnp.argsort(-score, axis=-1, stable=True), axis=-1, stable=True)
        keep = visual & (rank < keep_n)
        dropped = decode[:, :, None] & (visual & ~keep)[:, None, :]
        masks.append(base & ~dropped)
        kept.append(keep)
    return jnp.stack(masks), jnp.stack(kept)


def evict_logits(
    model: MultimodalModel, params, inputs: MultimodalInputs, targets: jax.Array, budget: float
) -> jax.Array:
    """Teacher-forced logits ``[batch, length, vocab]`` of ``evict_question@budget``: a forward
    of the dense ``model`` whose every attention layer reads its eviction mask."""
    masks, _ = evict_masks(model, params, inputs, targets, budget)
    return masked_logits(model, params, inputs, lambda layer: masks[layer])


@dataclasses.dataclass(frozen=True)
class EvictQuestion(Method):
    name = "evict_question"
    takes_budget = True
    color = (44, 160, 44)

    def runner(self, base: MultimodalConfig) -> Runner:
        config = with_attention(base, "dense")
        model = MultimodalModel(config)

        def logits(params, inputs, targets, top_k):
            del top_k
            return evict_logits(model, params, inputs, targets, self.budget)

        return Runner(self, config, logits)

    def visual_kv(self, num_visual: np.ndarray, top_k: int | None, region_size: int) -> np.ndarray:
        return np.asarray(kept_count(self.budget, num_visual))

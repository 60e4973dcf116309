"""What the model attended to: the regions gaze selected, and attention probabilities
recomputed outside the model from the queries and keys a forward captured.

The attention maps (:func:`attention_to_visual`) and the ``evict_question`` evaluation method
both read :func:`attention_probabilities` over :func:`rotated_queries_keys`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gazejax.gaze.inputs import MultimodalInputs
from gazejax.inference.prompts import Prompt
from gazejax.models.attention import apply_rope, rope_cos_sin
from gazejax.models.decoder import dense_visibility
from gazejax.models.mllm import MultimodalConfig, MultimodalModel
from kernels.gaze_attention import TokenKind

# --- Routing -----------------------------------------------------------------------------------


def selections_at(state: dict, slot) -> jax.Array | None:
    """int32 ``[num_layers, num_heads, top_k]``: the regions the query at storage ``slot`` of
    sample 0 selected (``-1``: none), read from a forward's sown ``intermediates``; None when
    the forward did not route (dense attention)."""
    decoder = state.get("intermediates", {}).get("decoder", {})
    layers = sorted((k for k in decoder if k.startswith("layers_")), key=lambda k: int(k[7:]))
    out = []
    for name in layers:
        selection = decoder[name]["self_attn"]["selection"][0]
        out.append(jnp.where(selection.valid, selection.region, -1)[0, slot])
    return jnp.stack(out) if out else None


def region_cells(prompt: Prompt, config: MultimodalConfig) -> dict[int, list[tuple]]:
    """Region id -> ``[(unit, row0, col0, row1, col1), ...]``: the token rectangle (rows and
    columns ``[row0, row1)``, ``[col0, col1)`` of the unit's ``h × w`` grid) it covers on each
    image / frame (a region of ``r_t > 1`` frames covers several). Read from the packed
    layout (:func:`gazejax.gaze.regions.build_layout`): the slots of each region and the raster
    index of their visual tokens."""
    h, w = config.unit_grid
    region = np.asarray(prompt.inputs.meta.region[0])
    visual = np.asarray(prompt.inputs.visual_index[0])
    slots = np.flatnonzero((region >= 0) & (visual >= 0))
    cells: dict[tuple[int, int], list] = {}
    for s in slots:
        unit, index = divmod(int(visual[s]), h * w)
        cells.setdefault((int(region[s]), unit), []).append(divmod(index, w))
    out: dict[int, list[tuple]] = {}
    for (r, unit), rc in sorted(cells.items()):
        rows, cols = zip(*rc, strict=True)
        out.setdefault(r, []).append((unit, min(rows), min(cols), max(rows) + 1, max(cols) + 1))
    return out


def region_fractions(selection: np.ndarray, num_regions: int) -> np.ndarray:
    """float ``[num_regions]``: the fraction of (layer, head) pairs whose selection
    (``[num_layers, num_heads, top_k]`` region ids, -1 none) holds each region."""
    layers, heads = selection.shape[:2]
    counts = np.zeros(num_regions + 1)
    for ids in selection.reshape(layers * heads, -1):
        counts[np.unique(ids[ids >= 0])] += 1
    return counts[:num_regions] / (layers * heads)


# --- Attention probabilities -------------------------------------------------------------------


def rotated_queries_keys(
    model: MultimodalModel, params, inputs: MultimodalInputs, top_k: int | None = None
) -> tuple[list[tuple[jax.Array, jax.Array]], dict]:
    """One forward of ``model`` capturing every layer's queries and keys as attention uses them
    (after the q/k norms, for Qwen3, and RoPE).

    Returns:
      per layer ``(query [batch, length, num_heads, head_dim], key [batch, length,
      num_kv_heads, head_dim])``, and the forward's ``intermediates`` state (gaze selections).
    """
    cfg = model.config.decoder
    names = ("q_norm", "k_norm") if cfg.qk_norm else ("q_proj", "k_proj")
    _, state = model.apply(
        {"params": params},
        inputs,
        top_k=top_k,
        capture_intermediates=lambda mdl, method: method == "__call__" and mdl.name in names,
        mutable=["intermediates"],
    )
    position = jnp.maximum(inputs.meta.position, 0)
    cos, sin = rope_cos_sin(position, cfg.head_dim, cfg.rope_theta)
    layers = state["intermediates"]["decoder"]
    out = []
    for layer in range(cfg.num_layers):
        attn = layers[f"layers_{layer}"]["self_attn"]
        query = apply_rope(attn[names[0]]["__call__"][0], cos, sin)
        key = apply_rope(attn[names[1]]["__call__"][0], cos, sin)
        out.append((query, key))
    return out, state


def attention_probabilities(query: jax.Array, key: jax.Array, visible: jax.Array) -> jax.Array:
    """Softmax attention weights, float32 ``[batch, num_heads, q_len, kv_len]``.

    Args:
      query: ``[batch, q_len, num_heads, head_dim]``.
      key: ``[batch, kv_len, num_kv_heads, head_dim]`` (GQA: each key head serves
        ``num_heads // num_kv_heads`` consecutive query heads).
      visible: bool, broadcastable to ``[batch, num_heads, q_len, kv_len]``; a row that sees
        nothing is all zeros.
    """
    head_dim = query.shape[-1]
    key = jnp.repeat(key.astype(jnp.float32), query.shape[2] // key.shape[2], axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", query.astype(jnp.float32), key) * head_dim**-0.5
    scores = jnp.where(visible, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(visible, jnp.exp(scores - row_max), 0.0)
    return weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-30)


def attention_to_visual(
    model: MultimodalModel, params, prompt: Prompt, top_k: int | None = None
) -> np.ndarray:
    """The last prompt token's attention over the prompt's slots, float ``[length]``: the
    softmax weights averaged over heads, then layers (for gaze, the mask keeps text, context
    tokens and each head's selected regions, so weights outside them are zero; ``top_k``: gaze's
    K, default the config's; dense attention does not read it)."""
    cfg = model.config.decoder
    gaze = cfg.attention == "gaze"
    forward = jax.jit(lambda p, inputs: rotated_queries_keys(model, p, inputs, top_k))
    layers, state = forward(params, prompt.inputs)
    meta = prompt.inputs.meta
    slot = prompt.last_slot
    visible = np.broadcast_to(
        np.asarray(dense_visibility(meta, meta)[0, slot]), (cfg.num_heads, meta.kind.shape[1])
    ).copy()  # [heads, length]
    selection = np.asarray(selections_at(state, slot)) if gaze else None
    kind = np.asarray(meta.kind[0])
    region = np.asarray(meta.region[0])
    per_layer = []
    for layer, (query, key) in enumerate(layers):
        layer_visible = visible.copy()
        if selection is not None:
            for head in range(cfg.num_heads):
                chosen = np.isin(region, selection[layer, head][selection[layer, head] >= 0])
                layer_visible[head] &= (kind != TokenKind.VISUAL) | chosen
        probs = attention_probabilities(
            query[:, slot : slot + 1], key, jnp.asarray(layer_visible)[None, :, None]
        )  # [1, heads, 1, length]
        per_layer.append(np.asarray(probs[0, :, 0]).mean(axis=0))
    return np.mean(per_layer, axis=0)

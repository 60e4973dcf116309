"""Answer a question about images or a video with a trained gazejax model.

    python -m gazejax.generate --checkpoint WORKDIR --image cat.png --prompt "what color?" \\
        [--video clip.mp4 | --video frames/] [--max-new-tokens 32] [--temperature T --top-p P] \\
        [--top-k K] [--attention dense|gaze] [--routing-map OUT.png] [--attention-map OUT.png]

The prompt is built with the training template (ChatML, ``config.data.system_prompt``; one
``<image>`` placeholder per image and one per video, before the question, unless the prompt
places them itself), prefilled once into the KV cache, then decoded one token per jitted step
with :meth:`MultimodalModel.extend` (gaze decode reads the text, the context tokens and the
selected regions only) until ``<|im_end|>`` or ``--max-new-tokens``.

Which query chose a token's regions: token ``i`` is predicted by the query of the token before
it (the last prompt token for ``i = 0``), so ``selections[i]`` are that query's regions.

Routing map (``--routing-map``, the paper's figures 4–5): one row per generated token (at most
:data:`MAX_MAP_TOKENS`), one panel per image / frame; each region is shaded by the *fraction of
(layer, head) pairs that selected it* for that token (1 = every head of every layer).

Attention map (``--attention-map``, figure 3): for the first generated token, the attention
weights of its query over the visual tokens, averaged over heads then layers, as heatmaps: top
row from a dense forward of the same weights, bottom row from a gaze forward (zero outside the
selected regions). Each row's colour scale runs from 0 to its own maximum.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from PIL import Image, ImageDraw, ImageFont

from gazejax.checkpointing import Checkpointer
from gazejax.data.images import read_image
from gazejax.data.packing import Text, Visual, interleave, pack_batch
from gazejax.data.records import DataError
from gazejax.data.template import DEFAULT_SYSTEM_PROMPT, chatml_pieces
from gazejax.data.video import read_video
from gazejax.data.vocab import IM_END_TOKEN, IMAGE_TOKEN, build_tokenizer
from gazejax.decoding import sample_next_token
from gazejax.gaze.inputs import MultimodalInputs
from gazejax.models.attention import apply_rope, rope_cos_sin
from gazejax.models.decoder import KVCache, dense_visibility
from gazejax.models.from_config import multimodal_config
from gazejax.models.mllm import MultimodalConfig, MultimodalModel
from kernels.gaze_attention import TokenKind, TokenMeta

MAX_MAP_TOKENS = 8
"""Rows of a routing map: the first generated tokens, at most this many."""
PANEL_SIZE = 160
"""Side in pixels of one image / frame panel in the maps."""
LABEL_WIDTH = 96
"""Width in pixels of the label column of the maps."""
GAP = 4
"""Pixels between panels and around the map."""


# --- Loading -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A trained model ready to generate.

    Attributes:
      config: the model's :class:`MultimodalConfig`.
      params: its parameters.
      tokenizer: the training tokenizer (the built-in one for synthetic data).
      system_prompt: the training system prompt.
      max_frames: frames sampled from a video (the training data's setting).
      step: the restored training step.
    """

    config: MultimodalConfig
    params: dict
    tokenizer: tokenizers.Tokenizer
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_frames: int = 8
    step: int | None = None


def load_checkpoint(workdir: str | os.PathLike, step: int | None = None) -> Checkpoint:
    """Restores the parameters of a training workdir (``config.json`` + ``checkpoints/``).

    Args:
      workdir: the directory given to ``python -m gazejax.train --workdir``.
      step: the checkpoint step; default the latest.

    Raises:
      FileNotFoundError: no ``config.json`` or no checkpoint (naming the path).
    """
    workdir = os.path.abspath(os.fspath(workdir))
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: no config.json (not a training workdir?)")
    with open(config_path) as f:
        config = json.load(f)
    directory = os.path.join(workdir, "checkpoints")
    checkpointer = (
        Checkpointer(workdir, every_steps=1, max_to_keep=1) if os.path.isdir(directory) else None
    )
    steps = checkpointer.all_steps() if checkpointer else []
    if step is None and steps:
        step = steps[-1]
    if step not in steps:
        wanted = "any step" if step is None else f"step {step}"
        raise FileNotFoundError(f"{directory}: no checkpoint of {wanted} (have {steps})")
    state = checkpointer.restore_as_saved(step)
    checkpointer.close()
    params = jax.tree.map(jnp.asarray, state["params"])
    data = config.get("data", {})
    if data.get("name", "synthetic") == "synthetic":
        tokenizer = build_tokenizer()
        max_frames = data.get("synthetic", {}).get("video_frames", 8)
    else:
        tokenizer = tokenizers.Tokenizer.from_file(data["tokenizer"])
        max_frames = data.get("jsonl", {}).get("max_frames", 8)
    return Checkpoint(
        config=multimodal_config(config["model"]),
        params=params,
        tokenizer=tokenizer,
        system_prompt=data.get("system_prompt", DEFAULT_SYSTEM_PROMPT),
        max_frames=int(max_frames),
        step=step,
    )


def with_attention(config: MultimodalConfig, attention: str) -> MultimodalConfig:
    """``config`` with ``decoder.attention`` replaced (same parameters; validated)."""
    decoder = dataclasses.replace(config.decoder, attention=attention)
    return dataclasses.replace(config, decoder=decoder)


# --- Prompt ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A packed prompt (batch 1) and what generation needs to know about it.

    Attributes:
      inputs: the model inputs, ``length`` slots (the prompt, then padding).
      items: the text spans and visuals it was packed from (to append generated text).
      last_slot: storage slot of the last prompt token (its logits predict the first token).
      next_position: position id of the first generated token.
      num_unrouted: text + context tokens of the prompt (a gaze decode bound).
      length: padded slot count (a static shape: prompts of one length compile once).
    """

    inputs: MultimodalInputs
    items: list
    last_slot: int
    next_position: int
    num_unrouted: int
    length: int


def prompt_items(
    tokenizer: tokenizers.Tokenizer,
    question: str,
    visuals: Sequence[np.ndarray],
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> list[Text | Visual]:
    """A one-turn ChatML prompt, tokenized exactly as training does, up to ``assistant\\n``.

    Args:
      tokenizer: the training tokenizer; it must know ``<image>``.
      question: the user's text; without ``<image>`` placeholders, one per visual is put first
        (``"<image>\\n" * n + question``, as the training data).
      visuals: float32 ``[frames, H, W, 3]`` per image (one frame) or video, preprocessed.
      system_prompt: the training system prompt.
    """
    if IMAGE_TOKEN not in question:
        question = f"{IMAGE_TOKEN}\n" * len(visuals) + question
    conversation = [{"from": "human", "value": question}, {"from": "gpt", "value": ""}]
    pieces = chatml_pieces(conversation, system_prompt)[:-3]  # up to "<|im_start|>assistant\n"
    ids = [i for text, _ in pieces for i in tokenizer.encode(text, add_special_tokens=False).ids]
    placeholder = tokenizer.token_to_id(IMAGE_TOKEN)
    if placeholder is None:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token")
    return interleave(
        np.asarray(ids, np.int32), placeholder, [Visual(np.asarray(v)) for v in visuals]
    )


def build_prompt(
    config: MultimodalConfig,
    tokenizer: tokenizers.Tokenizer,
    question: str,
    visuals: Sequence[np.ndarray],
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    pad_multiple: int = 64,
) -> Prompt:
    """:func:`prompt_items` packed by :func:`pack_prompt` (``config``: the model's; the slot
    count is rounded up to a multiple of ``pad_multiple``, so prompts compile less often)."""
    items = prompt_items(tokenizer, question, visuals, system_prompt)
    return pack_prompt(config, items, pad_multiple)


def pack_prompt(config: MultimodalConfig, items: list, pad_multiple: int = 1) -> Prompt:
    """Packs text spans and visuals (batch 1) into ``ceil(slots / pad_multiple)`` slots."""
    per_unit = config.tokens_per_unit + config.num_context_tokens
    units = sum(len(x.frames) for x in items if isinstance(x, Visual))
    text = sum(len(x.ids) for x in items if isinstance(x, Text))
    needed = text + units * per_unit + units * config.tokens_per_unit  # generous upper bound
    inputs, _ = pack_batch(
        [items],
        config.geometry,
        length=needed,
        max_units=max(units, 1),
        num_regions=max(units * config.tokens_per_unit, 1),
    )
    kind = np.asarray(inputs.meta.kind[0])
    position = np.asarray(inputs.meta.position[0])
    valid = np.flatnonzero(kind != TokenKind.PADDING)
    used = int(valid.max()) + 1
    regions = int(np.asarray(inputs.meta.region[0]).max()) + 1
    length = math.ceil(used / pad_multiple) * pad_multiple
    inputs, _ = pack_batch(
        [items],
        config.geometry,
        length=length,
        max_units=max(units, 1),
        num_regions=max(regions, 1),
    )
    return Prompt(
        inputs=inputs,
        items=list(items),
        last_slot=int(valid[np.argmax(position[valid])]),
        next_position=int(position.max()) + 1,
        num_unrouted=int(np.isin(kind, (TokenKind.TEXT, TokenKind.CONTEXT)).sum()),
        length=length,
    )


def load_visuals(
    images: Sequence[str] = (),
    videos: Sequence[str] = (),
    *,
    image_size: int,
    max_frames: int = 8,
    fps: float = 1.0,
) -> list[np.ndarray]:
    """Preprocessed ``[frames, H, W, 3]`` arrays: the images, then the videos (file or folder).

    Raises:
      DataError: a missing, unreadable or corrupt file (its path first in the message).
    """
    out = [read_image(path, image_size)[None] for path in images]
    for path in videos:
        frames, _ = read_video(path, image_size=image_size, max_frames=max_frames, fps=fps)
        out.append(frames)
    return out


# --- Generation --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What :func:`generate` produced.

    Attributes:
      text: the answer, decoded without special tokens.
      token_ids: int32 ``[n]``: the generated tokens, the stop token included when emitted.
      selections: gaze only: int32 ``[n, num_layers, num_heads, top_k]`` region ids selected
        by the query that predicted each token (``-1``: no region in that slot); else None.
      finished: whether generation stopped at the stop token.
    """

    text: str
    token_ids: np.ndarray
    selections: np.ndarray | None
    finished: bool


def _selections(state, slot) -> jax.Array | None:
    """``[num_layers, num_heads, top_k]`` sown selections of the query at ``slot``."""
    decoder = state.get("intermediates", {}).get("decoder", {})
    layers = sorted((k for k in decoder if k.startswith("layers_")), key=lambda k: int(k[7:]))
    out = []
    for name in layers:
        selection = decoder[name]["self_attn"]["selection"][0]
        out.append(jnp.where(selection.valid, selection.region, -1)[0, slot])
    return jnp.stack(out) if out else None


@functools.partial(jax.jit, static_argnames=("model", "top_k", "max_len"))
def _prefill(model: MultimodalModel, params, inputs: MultimodalInputs, last_slot, top_k, max_len):
    cache = KVCache.empty(model.config.decoder, 1, max_len, regions=inputs.regions)
    slots = jnp.reshape(last_slot, (1, 1))
    (logits, cache), state = model.apply(
        {"params": params},
        inputs,
        top_k=top_k,
        cache=cache,
        logit_slots=slots,
        mutable=["intermediates"],
    )
    return logits[0, 0], cache, _selections(state, last_slot)


@functools.partial(
    jax.jit,
    static_argnames=("model", "top_k", "max_unrouted_tokens"),
    donate_argnames=("cache",),
)
def _step(model: MultimodalModel, params, token, position, cache, top_k, max_unrouted_tokens):
    """One decode step of ``token`` (int32 scalar) at ``position``; compiled once per shape."""
    shape = (1, 1)
    meta = TokenMeta(
        kind=jnp.full(shape, TokenKind.TEXT, jnp.int32),
        unit=jnp.full(shape, -1, jnp.int32),
        region=jnp.full(shape, -1, jnp.int32),
        position=jnp.full(shape, position, jnp.int32),
    )
    (logits, cache), state = model.apply(
        {"params": params},
        jnp.full(shape, token, jnp.int32),
        meta,
        cache,
        top_k=top_k,
        max_unrouted_tokens=max_unrouted_tokens,
        method=MultimodalModel.extend,
        mutable=["intermediates"],
    )
    return logits[0, -1], cache, _selections(state, 0)


def generate(
    model: MultimodalModel,
    params,
    prompt: Prompt,
    max_new_tokens: int,
    *,
    tokenizer: tokenizers.Tokenizer | None = None,
    top_k: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
) -> GenerationResult:
    """Prefills ``prompt`` into a KV cache, then decodes one jitted step per token.

    Args:
      model, params: a :class:`MultimodalModel` (dense or gaze attention) and its parameters.
      prompt: from :func:`build_prompt`.
      max_new_tokens: the most tokens to generate.
      tokenizer: decodes the answer's text (empty text without one); its ``<|im_end|>`` is the
        default ``eos_id``.
      top_k: gaze K, regions per query head; default ``model.config.decoder.gaze_top_k``.
      temperature, top_p: see :func:`gazejax.decoding.sample_next_token`; 0 is greedy.
      rng: PRNG key, needed when sampling.
      eos_id: stop once this token is generated.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    gaze = model.config.decoder.attention == "gaze"
    top_k = (top_k or model.config.decoder.gaze_top_k) if gaze else None
    if eos_id is None and tokenizer is not None:
        eos_id = tokenizer.token_to_id(IM_END_TOKEN)
    if temperature > 0 and rng is None:
        rng = jax.random.key(0)
    logits, cache, selection = _prefill(
        model,
        params,
        prompt.inputs,
        jnp.int32(prompt.last_slot),
        top_k=top_k,
        max_len=prompt.length + max_new_tokens,
    )
    unrouted = prompt.num_unrouted + max_new_tokens if gaze else None
    tokens, selections = [], []
    finished = False
    for i in range(max_new_tokens):
        step_rng = None if rng is None else jax.random.fold_in(rng, i)
        token = int(sample_next_token(logits[None], step_rng, temperature, top_p)[0])
        tokens.append(token)
        if selection is not None:
            selections.append(np.asarray(selection))
        if token == eos_id:
            finished = True
            break
        if i + 1 == max_new_tokens:
            break
        logits, cache, selection = _step(
            model,
            params,
            jnp.int32(token),
            jnp.int32(prompt.next_position + i),
            cache,
            top_k=top_k,
            max_unrouted_tokens=unrouted,
        )
    token_ids = np.asarray(tokens, np.int32)
    text = "" if tokenizer is None else tokenizer.decode(tokens, skip_special_tokens=True)
    return GenerationResult(
        text=text,
        token_ids=token_ids,
        selections=np.stack(selections) if selections else None,
        finished=finished,
    )


# --- Geometry and attention weights ------------------------------------------------------------


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


def attention_to_visual(
    model: MultimodalModel, params, prompt: Prompt, top_k: int | None = None
) -> np.ndarray:
    """The last prompt token's attention over the prompt's slots, float ``[length]``: the
    softmax weights averaged over heads, then layers (queries and keys captured from a forward
    of ``model``; for gaze, the mask keeps text, context tokens and each head's selected
    regions, so weights outside them are zero)."""
    cfg = model.config.decoder
    names = ("q_norm", "k_norm") if cfg.qk_norm else ("q_proj", "k_proj")
    gaze = cfg.attention == "gaze"
    k = (top_k or cfg.gaze_top_k) if gaze else None

    def forward(params, inputs):
        return model.apply(
            {"params": params},
            inputs,
            top_k=k,
            capture_intermediates=lambda mdl, method: method == "__call__" and mdl.name in names,
            mutable=["intermediates"],
        )

    _, state = jax.jit(forward)(params, prompt.inputs)
    meta = prompt.inputs.meta
    slot = prompt.last_slot
    cos, sin = rope_cos_sin(jnp.maximum(meta.position, 0), cfg.head_dim, cfg.rope_theta)
    mask = np.asarray(dense_visibility(meta, meta)[0, slot])  # [length]
    kind = np.asarray(meta.kind[0])
    region = np.asarray(meta.region[0])
    selection = np.asarray(_selections(state, slot)) if gaze else None
    decoder = state["intermediates"]["decoder"]
    group = cfg.num_heads // cfg.num_kv_heads
    per_layer = []
    for layer in range(cfg.num_layers):
        attn = decoder[f"layers_{layer}"]["self_attn"]
        q = apply_rope(attn[names[0]]["__call__"][0], cos, sin)[0, slot]  # [heads, dim]
        k = apply_rope(attn[names[1]]["__call__"][0], cos, sin)[0]  # [length, kv, dim]
        k = jnp.repeat(k, group, axis=1)
        scores = np.asarray(jnp.einsum("hd,lhd->hl", q, k), np.float64) / math.sqrt(cfg.head_dim)
        visible = np.broadcast_to(mask, scores.shape).copy()
        if selection is not None:
            for head in range(cfg.num_heads):
                chosen = np.isin(region, selection[layer, head][selection[layer, head] >= 0])
                visible[head] &= (kind != TokenKind.VISUAL) | chosen
        scores = np.where(visible, scores, -np.inf)
        scores -= scores.max(axis=1, keepdims=True)
        weights = np.exp(scores)
        weights /= weights.sum(axis=1, keepdims=True)
        per_layer.append(weights.mean(axis=0))
    return np.mean(per_layer, axis=0)


# --- Drawing -----------------------------------------------------------------------------------


def _unit_images(prompt: Prompt, panel: int) -> list[Image.Image]:
    """The prompt's images / frames as RGB panels (SigLIP normalisation undone)."""
    items = [v for v in prompt.items if isinstance(v, Visual)]
    frames = [f for v in items for f in v.frames]
    out = []
    for f in frames:
        pixels = np.clip((np.asarray(f) * 0.5 + 0.5) * 255.0, 0, 255).astype(np.uint8)
        out.append(Image.fromarray(pixels).convert("RGB").resize((panel, panel)))
    return out


def map_size(rows: int, units: int, panel: int = PANEL_SIZE) -> tuple[int, int]:
    """``(width, height)`` in pixels of a map with ``rows`` rows of ``units`` panels."""
    return (
        LABEL_WIDTH + units * (panel + GAP) + GAP,
        GAP + rows * (panel + GAP),
    )


def _canvas(rows: int, units: int, panel: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", map_size(rows, units, panel), (255, 255, 255))
    return image, ImageDraw.Draw(image)


def _origin(row: int, unit: int, panel: int) -> tuple[int, int]:
    return LABEL_WIDTH + GAP + unit * (panel + GAP), GAP + row * (panel + GAP)


def _label(draw: ImageDraw.ImageDraw, row: int, panel: int, text: str) -> None:
    font = ImageFont.load_default()
    draw.text((GAP, GAP + row * (panel + GAP) + panel // 2 - 6), text[:14], (0, 0, 0), font=font)


def draw_routing_map(
    path: str | os.PathLike,
    prompt: Prompt,
    config: MultimodalConfig,
    result: GenerationResult,
    tokenizer: tokenizers.Tokenizer | None = None,
    panel: int = PANEL_SIZE,
    max_tokens: int = MAX_MAP_TOKENS,
) -> tuple[int, int]:
    """Writes the routing map PNG (see the module docstring); returns its ``(width, height)``.

    Row ``i`` is generated token ``i`` (labelled with its text); each region rectangle on each
    image / frame is outlined in grey and shaded red with opacity proportional to the fraction
    of (layer, head) pairs that selected it (0: not shaded).
    """
    if result.selections is None:
        raise ValueError("a routing map needs gaze attention (the result has no selections)")
    cells = region_cells(prompt, config)
    h, w = config.unit_grid
    images = _unit_images(prompt, panel)
    rows = min(len(result.token_ids), max_tokens)
    canvas, draw = _canvas(rows, len(images), panel)
    num_regions = prompt.inputs.regions.num_regions
    for row in range(rows):
        token = int(result.token_ids[row])
        label = repr(tokenizer.decode([token], skip_special_tokens=False)) if tokenizer else ""
        _label(draw, row, panel, f"{row}: {label or token}")
        fractions = region_fractions(result.selections[row], num_regions)
        for unit, image in enumerate(images):
            x0, y0 = _origin(row, unit, panel)
            overlay = Image.new("RGBA", (panel, panel), (0, 0, 0, 0))
            shade = ImageDraw.Draw(overlay)
            for r, rects in cells.items():
                for u, r0, c0, r1, c1 in rects:
                    if u != unit:
                        continue
                    box = (c0 * panel // w, r0 * panel // h, c1 * panel // w, r1 * panel // h)
                    alpha = int(round(220 * fractions[r]))
                    shade.rectangle(box, fill=(255, 0, 0, alpha), outline=(128, 128, 128, 160))
            canvas.paste(
                Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB"), (x0, y0)
            )
    canvas.save(path)
    return canvas.size


def _heat(image: Image.Image, values: np.ndarray, vmax: float) -> Image.Image:
    """``image`` blended with a red-yellow heatmap of ``values [h, w]`` scaled to ``vmax``."""
    v = np.clip(values / vmax, 0, 1) if vmax > 0 else np.zeros_like(values)
    rgb = np.stack([255 * np.minimum(1, 2 * v), 255 * np.maximum(0, 2 * v - 1), 0 * v], -1)
    alpha = (200 * v)[..., None]
    heat = Image.fromarray(np.concatenate([rgb, alpha], -1).astype(np.uint8), "RGBA")
    heat = heat.resize(image.size, Image.Resampling.NEAREST)
    return Image.alpha_composite(image.convert("L").convert("RGBA"), heat).convert("RGB")


def draw_attention_map(
    path: str | os.PathLike,
    prompt: Prompt,
    model: MultimodalModel,
    params,
    top_k: int | None = None,
    panel: int = PANEL_SIZE,
) -> tuple[int, int]:
    """Writes the dense-vs-gaze attention map PNG (module docstring); returns its size."""
    config = model.config
    k = top_k or config.decoder.gaze_top_k
    rows = [
        ("dense", MultimodalModel(with_attention(config, "dense"))),
        (f"gaze K={k}", MultimodalModel(with_attention(config, "gaze"))),
    ]
    h, w = config.unit_grid
    images = _unit_images(prompt, panel)
    visual = np.asarray(prompt.inputs.visual_index[0])
    canvas, draw = _canvas(len(rows), len(images), panel)
    for row, (name, variant) in enumerate(rows):
        weights = attention_to_visual(variant, params, prompt, top_k=k)
        grid = np.zeros((len(images), h * w))
        slots = np.flatnonzero(visual >= 0)
        grid.reshape(-1)[visual[slots]] = weights[slots]
        grid = grid.reshape(len(images), h, w)
        _label(draw, row, panel, f"{name} {grid.sum():.2f}")
        for unit, image in enumerate(images):
            canvas.paste(_heat(image, grid[unit], grid.max()), _origin(row, unit, panel))
    canvas.save(path)
    return canvas.size


# --- Command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gazejax.generate",
        description="Answer a question about images or a video with a trained gazejax model.",
    )
    parser.add_argument(
        "--checkpoint",
        "--workdir",
        required=True,
        help="training workdir (config.json + checkpoints/); the latest step unless --step",
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step to restore")
    parser.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    parser.add_argument(
        "--video", action="append", default=[], help="video file or folder of frames (repeatable)"
    )
    parser.add_argument(
        "--prompt",
        required=True,
        help="the question (<image> placeholders optional: one per image / video is put first)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--top-k", type=int, default=None, help="gaze K at decode (default: the model config's)"
    )
    parser.add_argument(
        "--attention",
        choices=("dense", "gaze"),
        default=None,
        help="override the model's attention (same weights)",
    )
    parser.add_argument(
        "--max-frames",
        type=int,
        default=None,
        help="frames sampled from a video (default: the training data's)",
    )
    parser.add_argument("--fps", type=float, default=1.0, help="video sampling rate")
    parser.add_argument(
        "--routing-map",
        default=None,
        metavar="OUT.png",
        help="draw, for each generated token (at most 8), the regions it selected; each region "
        "is shaded by the fraction of (layer, head) pairs that selected it (gaze only)",
    )
    parser.add_argument(
        "--attention-map",
        default=None,
        metavar="OUT.png",
        help="draw the first generated token's attention over the visual tokens (mean over "
        "heads and layers): dense forward vs gaze forward of the same weights",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (errors are printed to stderr, status 1)."""
    args = _parser().parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.checkpoint, args.step)
        config = checkpoint.config
        if args.attention:
            config = with_attention(config, args.attention)
        if args.routing_map and config.decoder.attention != "gaze":
            raise ValueError("--routing-map needs gaze attention (add --attention gaze)")
        if not args.image and not args.video:
            raise ValueError("give at least one --image or --video")
        visuals = load_visuals(
            args.image,
            args.video,
            image_size=config.vit.image_size,
            max_frames=args.max_frames or checkpoint.max_frames,
            fps=args.fps,
        )
        prompt = build_prompt(
            config, checkpoint.tokenizer, args.prompt, visuals, checkpoint.system_prompt
        )
        model = MultimodalModel(config)
        result = generate(
            model,
            checkpoint.params,
            prompt,
            args.max_new_tokens,
            tokenizer=checkpoint.tokenizer,
            top_k=args.top_k,
            temperature=args.temperature,
            top_p=args.top_p,
            rng=jax.random.key(args.seed),
        )
        print(result.text)
        if args.routing_map:
            size = draw_routing_map(args.routing_map, prompt, config, result, checkpoint.tokenizer)
            print(f"routing map: {args.routing_map} ({size[0]}x{size[1]})", file=sys.stderr)
        if args.attention_map:
            size = draw_attention_map(
                args.attention_map, prompt, model, checkpoint.params, top_k=args.top_k
            )
            print(f"attention map: {args.attention_map} ({size[0]}x{size[1]})", file=sys.stderr)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"gazejax.generate: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

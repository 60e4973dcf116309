"""PNG maps of what generation attended to, one panel per image / frame.

Routing map (the paper's figures 4–5): one row per generated token (at most
:data:`MAX_MAP_TOKENS`), one panel per image / frame; each region is shaded by the *fraction of
(layer, head) pairs that selected it* for that token (1 = every head of every layer).

Attention map (figure 3): for the first generated token, the attention weights of its query over
the visual tokens, averaged over heads then layers, as heatmaps: top row from a dense forward of
the same weights, bottom row from a gaze forward (zero outside the selected regions). Each row's
colour scale runs from 0 to its own maximum.
"""

from __future__ import annotations

import os

import numpy as np
import tokenizers
from PIL import Image, ImageDraw, ImageFont

from gazejax.data.packing import Visual
from gazejax.inference.checkpoints import with_attention
from gazejax.inference.decode import GenerationResult
from gazejax.inference.probes import attention_to_visual, region_cells, region_fractions
from gazejax.inference.prompts import Prompt
from gazejax.models.mllm import MultimodalConfig, MultimodalModel

MAX_MAP_TOKENS = 8
"""Rows of a routing map: the first generated tokens, at most this many."""
PANEL_SIZE = 160
"""Side in pixels of one image / frame panel in the maps."""
LABEL_WIDTH = 96
"""Width in pixels of the label column of the maps."""
GAP = 4
"""Pixels between panels and around the map."""


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
    k = config.decoder.gaze_top_k if top_k is None else top_k
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

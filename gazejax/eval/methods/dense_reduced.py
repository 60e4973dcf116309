"""``dense_reduced@f``: the projector's ``h×w`` tokens of every unit are average-pooled over
``s_h×s_w`` windows (ragged edge windows average what they hold) before the LLM, the window
chosen so that the kept fraction ``⌈h/s_h⌉·⌈w/s_w⌉ / (h·w)`` is closest to ``f`` (6×6: 2×2 →
25 %, 3×3 → 11 %, 1×2 → 50 %); the sequence is laid out for the pooled grid; dense attention.
A separate model (:class:`PooledModel`) with the checkpoint's parameters."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from gazejax.eval.methods.base import Method, Runner, plain_logits
from gazejax.models.mllm import MultimodalConfig, MultimodalModel


def pool_window(grid: tuple[int, int], budget: float) -> tuple[int, int]:
    """The ``(s_h, s_w)`` window whose kept fraction ``⌈h/s_h⌉·⌈w/s_w⌉/(h·w)`` is closest to
    ``budget`` (ties: not above the budget, then the squarest window)."""
    h, w = grid

    def key(window):
        kept = math.ceil(h / window[0]) * math.ceil(w / window[1]) / (h * w)
        return (round(abs(kept - budget), 9), kept > budget, abs(window[0] - window[1]), window)

    return min(((a, b) for a in range(1, h + 1) for b in range(1, w + 1)), key=key)


@dataclasses.dataclass(frozen=True)
class PooledConfig(MultimodalConfig):
    """A :class:`MultimodalConfig` whose units enter the LLM average-pooled over ``pool``
    windows: ``unit_grid`` is the pooled grid (so packing lays out the smaller grid)."""

    pool: tuple[int, int] = (1, 1)

    @property
    def projector_grid(self) -> tuple[int, int]:
        return self.projector.output_grid((self.vit.grid, self.vit.grid))

    @property
    def unit_grid(self) -> tuple[int, int]:
        h, w = self.projector_grid
        return math.ceil(h / self.pool[0]), math.ceil(w / self.pool[1])


def pooled_config(config: MultimodalConfig, pool: tuple[int, int]) -> PooledConfig:
    """``config`` (dense) with pooled units; region sizes capped at the pooled grid."""
    h, w = config.projector.output_grid((config.vit.grid, config.vit.grid))
    ph, pw = math.ceil(h / pool[0]), math.ceil(w / pool[1])
    region = (min(config.region_size[0], ph), min(config.region_size[1], pw))
    return PooledConfig(
        vit=config.vit,
        projector=config.projector,
        decoder=dataclasses.replace(config.decoder, attention="dense"),
        num_context_tokens=config.num_context_tokens,
        region_size=region + tuple(config.region_size[2:]),
        pool=tuple(pool),
    )


def pool_tokens(tokens: jax.Array, grid: tuple[int, int], pool: tuple[int, int]) -> jax.Array:
    """Average-pools ``[n, h*w, d]`` raster tokens over ``pool`` windows -> ``[n, h'*w', d]``
    (edge windows average the tokens they hold)."""
    n, _, d = tokens.shape
    (h, w), (sh, sw) = grid, pool
    gh, gw = math.ceil(h / sh), math.ceil(w / sw)
    pad = ((0, 0), (0, gh * sh - h), (0, gw * sw - w), (0, 0))
    x = jnp.pad(tokens.reshape(n, h, w, d).astype(jnp.float32), pad)
    counts = jnp.pad(jnp.ones((1, h, w, 1), jnp.float32), pad)
    total = x.reshape(n, gh, sh, gw, sw, d).sum((2, 4))
    count = counts.reshape(1, gh, sh, gw, sw, 1).sum((2, 4))
    return (total / count).reshape(n, gh * gw, d).astype(tokens.dtype)


class PooledModel(MultimodalModel):
    """:class:`MultimodalModel` (same parameters) whose visual tokens are pooled after the
    projector (``config`` is a :class:`PooledConfig`)."""

    def encode_units(self, units: jax.Array) -> jax.Array:
        cfg = self.config
        batch, max_units = units.shape[:2]
        features = self.vision(units.reshape(batch * max_units, *units.shape[2:]))
        grid = (cfg.vit.grid, cfg.vit.grid)
        tokens = self.projector(features, grid=grid)
        tokens = pool_tokens(tokens, cfg.projector_grid, cfg.pool)
        return tokens.reshape(batch, max_units * tokens.shape[1], tokens.shape[2])


@dataclasses.dataclass(frozen=True)
class DenseReduced(Method):
    name = "dense_reduced"
    takes_budget = True
    color = (31, 119, 180)

    def runner(self, base: MultimodalConfig) -> Runner:
        pool = pool_window(base.unit_grid, self.budget)
        config = pooled_config(base, pool)
        details = {"pool": list(pool), "pooled_grid": list(config.unit_grid)}
        return Runner(self, config, plain_logits(PooledModel(config)), details)

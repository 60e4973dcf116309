"""Vision -> language projector: optional 3x3 stride-2 token compression, then a 2-layer MLP.

projector = Projector(ProjectorConfig(vision_width=1152, hidden_size=2560, compress=True))
tokens = projector.apply({"params": params}, features, grid=(24, 24))  # [b, 144, 2560]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gazejax.models.layers import Projection, image_conv

Array = jax.Array
DType = Any  # a dtype name ("bfloat16") or a jnp dtype


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Projector hyper-parameters.

    Attributes:
      vision_width: width of the vision features.
      hidden_size: the LLM's hidden size; also the MLP's inner width (LLaVA's ``mlp2x_gelu``).
      compress: apply the token-compression convolution (``[h, w] -> [ceil(h/2), ceil(w/2)]``,
        4x fewer tokens) before the MLP.
      dtype, param_dtype: compute and parameter dtypes.
    """

    vision_width: int
    hidden_size: int
    compress: bool = False
    dtype: DType = "float32"
    param_dtype: DType = "float32"

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The token grid after the projector for an input ``grid`` ``(h, w)``."""
        h, w = grid
        return ((h + 1) // 2, (w + 1) // 2) if self.compress else (h, w)


def _square_grid(tokens: int) -> tuple[int, int]:
    side = round(tokens**0.5)
    if side * side != tokens:
        raise ValueError(f"{tokens} tokens are not a square grid; pass grid=(h, w)")
    return side, side


class Projector(nn.Module):
    """``[batch, h * w, vision_width] -> [batch, h' * w', hidden_size]`` (raster order)."""

    config: ProjectorConfig

    @nn.compact
    def __call__(self, x: Array, grid: tuple[int, int] | None = None) -> Array:
        """Projects vision features to LLM tokens.

        Args:
          x: ``[batch, tokens, vision_width]``, tokens in raster order over the patch grid.
          grid: ``(h, w)`` with ``h * w == tokens``; a square grid when None.
        Returns:
          ``[batch, h' * w', hidden_size]``, ``(h', w') = config.output_grid((h, w))``.
        """
        cfg = self.config
        batch, tokens, _ = x.shape
        h, w = grid if grid is not None else _square_grid(tokens)
        if h * w != tokens:
            raise ValueError(f"grid {(h, w)} does not hold {tokens} tokens")
        x = jnp.asarray(x, cfg.dtype)
        if cfg.compress:
            conv = image_conv(
                cfg.vision_width, 3, 2, ((1, 1), (1, 1)), cfg.dtype, cfg.param_dtype, "compress"
            )
            x = conv(x.reshape(batch, h, w, cfg.vision_width))
            x = x.reshape(batch, -1, cfg.vision_width)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        dense = dict(
            use_bias=True,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=nn.initializers.xavier_uniform(),
        )
        x = Projection((cfg.hidden_size,), ("embed", "mlp"), name="fc1", **dense)(x)
        x = nn.with_logical_constraint(nn.gelu(x, approximate=False), ("batch", "length", "mlp"))
        x = Projection((cfg.hidden_size,), ("mlp", "embed"), name="fc2", **dense)(x)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

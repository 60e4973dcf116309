"""SigLIP / SigLIP2 vision transformer (big_vision layout, Flax Linen).

    config = vit_config("So400m/16", image_size=384, output="penultimate")
    model = VisionTransformer(config)
    features = model.apply({"params": params}, pixel_values)  # [batch, 576, 1152]

Conv patch embedding, learned position embedding (bilinearly resampled when the input grid
differs from the stored one), pre-LayerNorm blocks with tanh-GELU MLPs, a final LayerNorm and
an optional SigLIP attention-pooling ("MAP") head. Activations are read without changing the
return value through the ``intermediates`` collection::

    features, state = model.apply(variables, pixel_values, mutable=["intermediates"])
    state["intermediates"]["layers_3"]["out"]  # (block output [batch, tokens, width],)

Parameter tree (``layers_{i}`` become one ``layers`` subtree with a leading ``depth`` axis
when ``scan=True``)::

    embedding/{kernel [p, p, 3, width], bias}    pos_embedding [grid * grid, width]
    layers_{i}/norm1, attn/{query,key,value,out}, norm2, mlp/{fc1,fc2}
    norm                                         head/... (pool="map" only)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gazejax.models.attention import dense_attention
from gazejax.models.layers import Projection, image_conv

Array = jax.Array
DType = Any  # a dtype name ("bfloat16") or a jnp dtype

# Architectures as in big_vision's ``decode_variant``; ``image_size`` is that of the common
# public SigLIP checkpoint of each size and may be overridden.
VARIANTS: dict[str, dict[str, int]] = {
    "So400m/14": dict(
        width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14, image_size=384
    ),
    "So400m/16": dict(
        width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=16, image_size=384
    ),
    "B/16": dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16, image_size=224),
    "L/16": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, patch_size=16, image_size=256),
    # Tiny variant for tests.
    "mu/4": dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4, image_size=16),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Vision transformer hyper-parameters.

    Attributes:
      width, depth, mlp_dim, num_heads: model size; ``head_dim = width // num_heads``.
      patch_size: square patch side in pixels.
      image_size: square training resolution; fixes the stored position-embedding grid
        ``image_size // patch_size``.
      layer_norm_eps: epsilon of every LayerNorm.
      dtype: compute dtype (e.g. ``"bfloat16"``); softmax and LayerNorm statistics stay float32.
      param_dtype: parameter dtype.
      scan: run the blocks with ``nn.scan`` (parameters stacked on a leading ``layers`` axis).
      remat: rematerialise each block in the backward pass.
      output: ``"last"``: the final-LayerNorm output; ``"penultimate"``: the output of block
        ``depth - 2`` without the final LayerNorm (Cambrian's projector input); an int ``n`` in
        ``[0, depth]``: the output of the first ``n`` blocks without the final LayerNorm (Hugging
        Face's ``hidden_states[n]``; 0 is the embedding, ``depth - 1`` is ``"penultimate"``).
      pool: ``"none"`` or ``"map"`` (SigLIP attention pooling head; its output is sown as
        ``intermediates/pooled``, never returned).
    """

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    image_size: int
    layer_norm_eps: float = 1e-6
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    scan: bool = False
    remat: bool = False
    output: str | int = "last"
    pool: str = "none"

    def __post_init__(self):
        valid_int = isinstance(self.output, int) and 0 <= self.output <= self.depth
        if not valid_int and self.output not in ("last", "penultimate"):
            raise ValueError(
                f"output must be 'last', 'penultimate' or a block count in [0, {self.depth}], "
                f"got {self.output!r}"
            )
        if self.pool not in ("none", "map"):
            raise ValueError(f"pool must be 'none' or 'map', got {self.pool!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.output == "penultimate" and self.depth < 2:
            raise ValueError("output='penultimate' needs depth >= 2")

    @property
    def output_blocks(self) -> int | None:
        """Blocks whose un-normalised output is returned; None for ``"last"`` (normalised)."""
        if self.output == "last":
            return None
        return self.depth - 1 if self.output == "penultimate" else self.output

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid(self) -> int:
        """Side of the stored position-embedding grid."""
        return self.image_size // self.patch_size


def vit_config(variant: str, **overrides: Any) -> ViTConfig:
    """``ViTConfig`` of a named variant (``"So400m/16"``, ``"mu/4"``, ...) with overrides."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; known: {sorted(VARIANTS)}")
    return ViTConfig(**{**VARIANTS[variant], **overrides})


def resample_posemb(posemb: Array, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Array:
    """Bilinearly resamples a position embedding to another grid (half-pixel centres, no
    antialiasing: ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``).

    Args:
      posemb: ``[old_h * old_w, width]``.
    Returns:
      ``[new_h * new_w, width]``; ``posemb`` itself when the grids are equal.
    """
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    width = posemb.shape[-1]
    grid = posemb.reshape(*old_grid, width).astype(jnp.float32)
    grid = jax.image.resize(grid, (*new_grid, width), method="bilinear", antialias=False)
    return grid.reshape(-1, width).astype(posemb.dtype)


def _projection(
    config: ViTConfig,
    features: tuple[int, ...],
    kernel_axes: tuple[str, ...],
    name: str,
    num_in_axes: int = 1,
) -> Projection:
    """A biased linear map with a Xavier-uniform kernel over its (flattened) in / out axes."""
    ndim = len(kernel_axes)
    init = nn.initializers.xavier_uniform(
        in_axis=tuple(range(num_in_axes)), out_axis=tuple(range(num_in_axes, ndim))
    )
    return Projection(
        features,
        kernel_axes,
        num_in_axes=num_in_axes,
        use_bias=True,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=init,
        name=name,
    )


def _out_projection(config: ViTConfig) -> Projection:
    """Attention output, ``[..., heads, head_dim] -> [..., width]``."""
    return _projection(config, (config.width,), ("heads", "head_dim", "embed"), "out", 2)


def _layer_norm(config: ViTConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def _constrain(x: Array) -> Array:
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Mlp(nn.Module):
    """``[batch, length, width] -> [batch, length, width]``: fc1, tanh-approximate GELU, fc2."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        h = _projection(cfg, (cfg.mlp_dim,), ("embed", "mlp"), "fc1")(x)
        h = nn.with_logical_constraint(nn.gelu(h, approximate=True), ("batch", "length", "mlp"))
        return _projection(cfg, (cfg.width,), ("mlp", "embed"), "fc2")(h)


class Attention(nn.Module):
    """Multi-head self-attention, ``[batch, length, width] -> [batch, length, width]``."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        heads = (cfg.num_heads, cfg.head_dim)
        names = ("embed", "heads", "head_dim")
        act = ("batch", "length", "heads", "head_dim")
        q, k, v = (
            nn.with_logical_constraint(_projection(cfg, heads, names, name)(x), act)
            for name in ("query", "key", "value")
        )
        return _out_projection(cfg)(dense_attention(q, k, v, mask=True))


class Block(nn.Module):
    """Pre-LayerNorm encoder block; sows its output as ``intermediates/out``."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``x: [batch, length, width] -> [batch, length, width]``."""
        cfg = self.config
        x = _constrain(x + Attention(cfg, name="attn")(_layer_norm(cfg, "norm1")(x)))
        x = _constrain(x + Mlp(cfg, name="mlp")(_layer_norm(cfg, "norm2")(x)))
        self.sow("intermediates", "out", x)
        return x


class MAPHead(nn.Module):
    """SigLIP multihead attention pooling: a learned probe attends to the tokens.

    The probe's query and the tokens' key / value projections share one ``in_proj`` kernel
    ``[3, width, heads, head_dim]`` (q, k, v), the layout of ``torch.nn.MultiheadAttention``.
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``x: [batch, length, width] -> [batch, width]``."""
        cfg = self.config
        probe = self.param(
            "probe",
            nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, None, "embed")),
            (1, 1, cfg.width),
            cfg.param_dtype,
        )
        kernel = self.param(
            "in_proj_kernel",
            nn.with_logical_partitioning(
                nn.initializers.xavier_uniform(in_axis=1, out_axis=(2, 3), batch_axis=(0,)),
                (None, "embed", "heads", "head_dim"),
            ),
            (3, cfg.width, cfg.num_heads, cfg.head_dim),
            cfg.param_dtype,
        )
        bias = self.param(
            "in_proj_bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, "heads", "head_dim")),
            (3, cfg.num_heads, cfg.head_dim),
            cfg.param_dtype,
        )
        x, probe, kernel, bias = (jnp.asarray(a, cfg.dtype) for a in (x, probe, kernel, bias))
        probe = jnp.broadcast_to(probe, (x.shape[0], 1, cfg.width))
        q, k, v = (
            jnp.einsum("bld,dhk->blhk", inputs, kernel[i]) + bias[i]
            for i, inputs in enumerate((probe, x, x))
        )
        y = _out_projection(cfg)(dense_attention(q, k, v, mask=True))
        y = y + Mlp(cfg, name="mlp")(_layer_norm(cfg, "norm")(y))
        return y[:, 0]


class VisionTransformer(nn.Module):
    """SigLIP ViT: ``pixel_values [batch, height, width, 3] -> [batch, tokens, width]``.

    ``pixel_values`` are normalised as the Hugging Face processor does ([-1, 1] for SigLIP);
    ``tokens = (height // patch) * (width // patch)`` in raster order.

    Sown ``intermediates``: ``embedded`` (patch plus position embeddings), ``layers_{i}/out``
    (one ``layers/out`` stacked over blocks under scan), ``encoded`` (the features before the
    final norm: the last block's output, or that of block ``output_blocks - 1`` when
    ``output`` is not ``"last"``) and ``pooled`` (``pool="map"``, ``[batch, width]``).

    The parameter tree does not depend on ``output``: when it is not ``"last"``, the later
    blocks, the final norm and the head are created at init but not run (under ``scan`` the
    later blocks still run: extra compute, no different result).
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        """``pixel_values [batch, height, width, 3] -> [batch, tokens, width]`` in ``dtype``."""
        cfg = self.config
        x = self._embed(pixel_values)
        full = cfg.output == "last" or self.is_initializing()
        block = nn.remat(Block, prevent_cse=not cfg.scan) if cfg.remat else Block
        blocks = cfg.depth if full else cfg.output_blocks
        if cfg.scan:
            x = self._scan_blocks(block, x, blocks)
        else:
            for i in range(blocks):
                x = block(cfg, name=f"layers_{i}")(x)
        self.sow("intermediates", "encoded", x)
        if not full:
            return x
        x = _constrain(_layer_norm(cfg, "norm")(x))
        if cfg.pool == "map":
            self.sow("intermediates", "pooled", MAPHead(cfg, name="head")(x))
        return x

    def _embed(self, pixel_values: Array) -> Array:
        """Patch embedding plus position embedding, ``-> [batch, tokens, width]``."""
        cfg = self.config
        p = cfg.patch_size
        conv = image_conv(cfg.width, p, p, "VALID", cfg.dtype, cfg.param_dtype, "embedding")
        x = conv(jnp.asarray(pixel_values, cfg.dtype))
        batch, h, w, _ = x.shape
        posemb = self.param(
            "pos_embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=cfg.width**-0.5), (None, "embed")
            ),
            (cfg.grid * cfg.grid, cfg.width),
            cfg.param_dtype,
        )
        posemb = resample_posemb(posemb, (cfg.grid, cfg.grid), (h, w))
        x = _constrain(x.reshape(batch, h * w, cfg.width) + posemb.astype(cfg.dtype))
        self.sow("intermediates", "embedded", x)
        return x

    def _scan_blocks(self, block: type[Block], x: Array, wanted: int) -> Array:
        """All blocks under ``nn.scan``; returns the output of block ``wanted - 1`` (``x`` for
        0; the carry keeps it beside the running activations)."""
        cfg = self.config

        def body(module: Block, carry, index):
            kept, y = carry
            y = module(y)
            return (jnp.where(index == wanted - 1, y, kept), y), None

        scan = nn.scan(
            body,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            length=cfg.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        (kept, _), _ = scan(block(cfg, name="layers"), (x, x), jnp.arange(cfg.depth))
        return kept

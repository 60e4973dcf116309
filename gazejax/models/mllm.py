"""The multimodal LLM: ViT -> projector -> decoder with dense or gaze attention.

Each image or video frame is a visual unit: the ViT encodes it, the projector maps its patch
features to LLM tokens on an ``h × w`` grid, and those tokens fill the unit's slots of the
sequence (stored region-major, positions in raster order; see :mod:`gazejax.gaze.regions`).
``num_context_tokens`` learnable context tokens follow each unit; their mask restricts them to
their own unit (DESIGN.md §2). The decoder's attention is ``config.decoder.attention``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from gazejax.gaze.geometry import PackingGeometry
from gazejax.gaze.inputs import MultimodalInputs
from gazejax.models.decoder import Decoder, DecoderConfig, KVCache
from gazejax.models.projector import Projector, ProjectorConfig
from gazejax.models.vit import VisionTransformer, ViTConfig
from kernels.gaze_attention import TokenMeta


@dataclasses.dataclass(frozen=True)
class MultimodalConfig:
    """The three parts and how visual units enter the decoder.

    Attributes:
      vit, projector, decoder: the parts' configs (``projector.hidden_size`` must equal
        ``decoder.hidden_size``, ``projector.vision_width`` the ViT width).
      num_context_tokens: ``|C|`` learnable tokens after each unit (0: none).
      region_size: ``(r_h, r_w)`` or ``(r_h, r_w, r_t)`` in projected tokens (and frames).
      units_per_encode: ``c``: the ViT and projector encode the batch's unit slots ``c`` per
        sample at a time, skipping a chunk of slots where no sample of the batch has a real
        unit (padding slots follow a sample's real units), so they run on
        ``ceil(max real units / c) · c`` slots per sample instead of every slot (0: every
        slot at once, as one batch; also where ``c`` does not divide the slot count).
    """

    vit: ViTConfig
    projector: ProjectorConfig
    decoder: DecoderConfig
    num_context_tokens: int = 4
    region_size: tuple[int, ...] = (6, 6, 1)
    units_per_encode: int = 0

    def __post_init__(self):
        if self.units_per_encode < 0:
            raise ValueError(f"units_per_encode must be >= 0, got {self.units_per_encode}")
        if self.projector.vision_width != self.vit.width:
            raise ValueError(
                f"projector.vision_width ({self.projector.vision_width}) must equal vit.width "
                f"({self.vit.width})"
            )
        if self.projector.hidden_size != self.decoder.hidden_size:
            raise ValueError(
                f"projector.hidden_size ({self.projector.hidden_size}) must equal "
                f"decoder.hidden_size ({self.decoder.hidden_size})"
            )
        self.geometry  # noqa: B018 (building it validates num_context_tokens and region_size)

    @property
    def unit_grid(self) -> tuple[int, int]:
        """``(h, w)``: a unit's token grid after the projector."""
        return self.projector.output_grid((self.vit.grid, self.vit.grid))

    @property
    def tokens_per_unit(self) -> int:
        return self.geometry.tokens_per_unit

    @property
    def geometry(self) -> PackingGeometry:
        """What packing needs to know of this model: unit grid, regions, context, image size."""
        return PackingGeometry(
            unit_grid=self.unit_grid,
            region_size=tuple(self.region_size),
            num_context_tokens=self.num_context_tokens,
            image_size=self.vit.image_size,
        )


class MultimodalModel(nn.Module):
    """ViT -> projector -> decoder; ``__call__`` returns logits ``[batch, length, vocab]``."""

    config: MultimodalConfig

    def setup(self):
        cfg = self.config
        self.vision = VisionTransformer(cfg.vit)
        self.projector = Projector(cfg.projector)
        self.decoder = Decoder(cfg.decoder)
        if cfg.num_context_tokens:
            self.context_tokens = self.param(
                "context_tokens",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                (cfg.num_context_tokens, cfg.decoder.hidden_size),
                cfg.decoder.param_dtype,
            )

    def encode_units(self, units: jax.Array, num_units: jax.Array | None = None) -> jax.Array:
        """Pixels ``[batch, max_units, H, W, 3]`` -> tokens ``[batch, max_units * N, embed]``.

        ``num_units`` (int ``[batch]``): each sample's real units, which come first; with
        ``config.units_per_encode`` the slots after them are encoded only where another sample
        has a real unit in the same chunk, else their tokens are zeros (read by no slot).
        """
        batch, max_units = units.shape[:2]
        chunk = self.config.units_per_encode
        if num_units is None or not chunk or max_units % chunk or self.is_initializing():
            return _encode(self.vision, self.projector, units)
        vision = VisionTransformer(self.config.vit, parent=None)  # this model's variables
        projector = Projector(self.config.projector, parent=None)
        variables = (self.vision.variables, self.projector.variables)

        def encode(pixels):  # [batch, chunk, H, W, 3] -> [batch, chunk * N, embed]
            return _encode(vision.bind(variables[0]), projector.bind(variables[1]), pixels)

        def step(_, j):
            pixels = jax.lax.dynamic_slice_in_dim(units, j * chunk, chunk, axis=1)
            shape = jax.eval_shape(encode, pixels)
            skip = lambda p: jnp.zeros(shape.shape, shape.dtype)  # noqa: E731
            return None, jax.lax.cond(jnp.any(num_units > j * chunk), encode, skip, pixels)

        _, tokens = jax.lax.scan(step, None, jnp.arange(max_units // chunk))
        # [chunks, batch, chunk * N, embed] -> [batch, max_units * N, embed]
        return jnp.moveaxis(tokens, 0, 1).reshape(batch, -1, tokens.shape[-1])

    def embed(self, inputs: MultimodalInputs) -> jax.Array:
        """The decoder's input embeddings ``[batch, length, embed]`` for a packed batch."""
        x = self.decoder.embed(inputs.input_ids)
        counts = ()  # only a chunked encoding reads them (a subclass may encode units alone)
        if self.config.units_per_encode:
            # A sample's real units: one past the highest unit its visual slots read (0: none).
            counts = (jnp.max(inputs.visual_index, axis=1) // self.config.tokens_per_unit + 1,)
        visual = self.encode_units(inputs.units, *counts).astype(x.dtype)
        gathered = jnp.take_along_axis(
            visual, jnp.maximum(inputs.visual_index, 0)[..., None], axis=1
        )
        x = jnp.where((inputs.visual_index >= 0)[..., None], gathered, x)
        if self.config.num_context_tokens:
            context = self.context_tokens.astype(x.dtype)[jnp.maximum(inputs.context_index, 0)]
            x = jnp.where((inputs.context_index >= 0)[..., None], context, x)
        return x

    def __call__(
        self,
        inputs: MultimodalInputs,
        *,
        top_k: int | None = None,
        cache: KVCache | None = None,
        logit_slots: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits ``[batch, length, vocab]`` (and the cache, when one is given: prefill).

        ``top_k`` overrides ``config.decoder.gaze_top_k`` (the progressive schedule, sweeps);
        ``logit_slots`` (int ``[batch, n]``) keeps only those slots' logits (a prefill's last).
        """
        return self.decoder(
            None,
            inputs_embeds=self.embed(inputs),
            token_meta=inputs.meta,
            regions=inputs.regions,
            top_k=top_k,
            cache=cache,
            logit_slots=logit_slots,
        )

    def extend(
        self,
        input_ids: jax.Array,
        meta: TokenMeta,
        cache: KVCache,
        *,
        top_k: int | None = None,
        max_unrouted_tokens: int | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """One decode step of text tokens ``[batch, seq]`` against the cache.

        ``max_unrouted_tokens`` (see :class:`~gazejax.models.decoder.Decoder`) makes a gaze
        step read only the text, the context tokens and the selected regions.
        """
        return self.decoder(
            input_ids,
            token_meta=meta,
            top_k=top_k,
            max_unrouted_tokens=max_unrouted_tokens,
            cache=cache,
        )


def _encode(vision: nn.Module, projector: nn.Module, units: jax.Array) -> jax.Array:
    """Every unit slot: pixels ``[batch, units, H, W, 3]`` -> ``[batch, units * N, embed]``."""
    batch, count = units.shape[:2]
    features = vision(units.reshape(batch * count, *units.shape[2:]))
    grid = (vision.config.grid, vision.config.grid)
    tokens = projector(features, grid=grid)
    return tokens.reshape(batch, count * tokens.shape[1], tokens.shape[2])

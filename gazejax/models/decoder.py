"""Qwen3 / Qwen2 / Qwen2.5 decoder-only language model with a functional KV cache.

Qwen3 normalises each head's query and key (RMSNorm over ``head_dim``) before RoPE and has no
qkv bias; Qwen2 / Qwen2.5 have q/k/v biases and no q/k norm. Both: RoPE (rotate-half), grouped
query attention, SwiGLU MLP, RMSNorm computed in float32, tied or untied embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gazejax.models.attention import (
    apply_rope,
    causal_attention,
    decode_attention,
    dense_attention,
    dense_visibility,
    rope_cos_sin,
)
from gazejax.models.layers import Projection
from gazejax.models.sequence_split import (
    current_sequence_split,
    split_decode_step,
    split_descriptors,
)
from gazejax.models.sharded_gaze import gaze_attention_on_mesh
from kernels.gaze_attention import (
    IMPLEMENTATIONS,
    ROUTINGS,
    RegionTable,
    TokenKind,
    TokenMeta,
    region_descriptors,
    validate_top_k,
)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of a Qwen-family decoder.

    ``qk_norm`` selects Qwen3 (True) or Qwen2 (False) attention; ``qkv_bias`` adds q/k/v biases
    (Qwen2) and ``out_bias`` an output-projection bias (Qwen3 with ``attention_bias``).
    ``dtype`` is the compute dtype; parameters are stored in ``param_dtype``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    qk_norm: bool = True
    qkv_bias: bool = False
    out_bias: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "dense"
    gaze_top_k: int = 1
    gaze_routing: str = "per_head"
    gaze_implementation: str = "xla"
    gaze_descriptor_keys: str = "post_rope"

    def __post_init__(self):
        choices = {
            "attention": ("dense", "gaze"),
            "gaze_routing": ROUTINGS,
            "gaze_implementation": IMPLEMENTATIONS,
            "gaze_descriptor_keys": ("post_rope", "pre_rope"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        validate_top_k(self.gaze_top_k)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")


@flax.struct.dataclass
class LayerCache:
    """One layer's cache: keys and values ``[batch·num_kv_heads, max_len, head_dim]``, one
    contiguous row block per (sample, KV head), row ``b·num_kv_heads + h`` (keys after the
    k-norm and RoPE, as attention reads them; a decode step reads them in place,
    :func:`~gazejax.models.attention.decode_attention`) and, for gaze attention, the region
    descriptors ``[batch, num_regions, num_kv_heads, head_dim]`` (else None)."""

    keys: jax.Array
    values: jax.Array
    descriptors: jax.Array | None


@flax.struct.dataclass
class KVCache:
    """The decoder's cache for a fixed number of slots.

    Attributes:
      layers: one :class:`LayerCache` per layer (separate arrays, so that each layer updates
        its slots in place when the cache is donated).
      meta: :class:`TokenMeta` ``[batch, max_len]`` of the slots; empty slots are padding.
      regions: :class:`RegionTable` of the visual tokens (gaze attention), else None.
      end: int32 scalar, the number of slots written so far (the same for every sample; samples
        of different lengths are left-padded and masked through ``meta``).
    """

    layers: tuple[LayerCache, ...]
    meta: TokenMeta
    regions: RegionTable | None
    end: jax.Array

    @classmethod
    def empty(
        cls,
        config: DecoderConfig,
        batch: int,
        max_len: int,
        regions: RegionTable | None = None,
        dtype: Dtype | None = None,
    ) -> KVCache:
        """An empty cache; gaze attention needs the ``regions`` of the sequence to come."""
        if config.attention == "gaze" and regions is None:
            raise ValueError("a gaze attention cache needs the region table")
        shape = (batch * config.num_kv_heads, max_len, config.head_dim)
        dtype = dtype or config.dtype
        descriptor_shape = (
            None
            if regions is None
            else (batch, regions.num_regions, config.num_kv_heads, config.head_dim)
        )

        def layer():  # distinct buffers, so that the cache can be donated
            descriptors = None
            if config.attention == "gaze":
                descriptors = jnp.zeros(descriptor_shape, jnp.float32)
            return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), descriptors)

        def empty_slots():
            return jnp.full((batch, max_len), -1, jnp.int32)

        return cls(
            layers=tuple(layer() for _ in range(config.num_layers)),
            meta=TokenMeta(*(empty_slots() for _ in range(4))),
            regions=regions,
            end=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.layers[0].keys.shape[1]

    def write_meta(self, meta: TokenMeta, start: jax.Array) -> TokenMeta:
        """The slots' metadata after writing ``meta [batch, seq]`` at slot ``start``."""
        return jax.tree.map(
            lambda old, new: jax.lax.dynamic_update_slice(old, new, (0, start)), self.meta, meta
        )

    def update(self, layers, meta: TokenMeta, regions, end) -> KVCache:
        layers = tuple(
            LayerCache(
                nn.with_logical_constraint(c.keys, CACHE_AXES),
                nn.with_logical_constraint(c.values, CACHE_AXES),
                c.descriptors,
            )
            for c in layers
        )
        return KVCache(layers=layers, meta=meta, regions=regions, end=end)


CACHE_AXES = ("cache_rows", "cache_length", "head_dim")  # cache_rows: batch · kv_heads
CACHE_SLOT_MULTIPLE = 128


def cache_slots(tokens: int) -> int:
    """Slots to allocate for ``tokens``: rounded up to a multiple of
    :data:`CACHE_SLOT_MULTIPLE`. XLA's GPU matmuls pad other lengths, which copies every
    layer's cache at every dense decode step (``tests/aot/compile_decode_step.py``), and the
    Pallas decode reads windows aligned to the TPU's tiles; the extra slots are padding."""
    return -(-tokens // CACHE_SLOT_MULTIPLE) * CACHE_SLOT_MULTIPLE


def _param(init, *axes):
    return nn.with_logical_partitioning(init, axes)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, computed in float32, cast back before the scale (as HF)."""

    eps: float
    dtype: Dtype
    param_dtype: Dtype
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", _param(nn.initializers.ones, self.axis_name), (x.shape[-1],), self.param_dtype
        )
        input_dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(self.dtype) * x32.astype(input_dtype)).astype(self.dtype)


def _dense(features, axes, use_bias, config, name, num_in_axes=1):
    """A :class:`Projection` with logical axes ``axes`` on its kernel."""
    return Projection(
        features=(features,) if isinstance(features, int) else features,
        kernel_axes=axes,
        num_in_axes=num_in_axes,
        use_bias=use_bias,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        name=name,
    )


@flax.struct.dataclass
class AttentionInputs:
    """What every layer's attention reads besides its own activations (one forward pass).

    Attributes:
      cos, sin: RoPE tables ``[batch, seq, head_dim]`` of the new tokens' positions.
      mask: dense attention: bool ``[batch, seq, kv_len]`` for a one-token step (or an
        explicit mask); None: blockwise from the metadata (:func:`causal_attention`).
      query_meta: :class:`TokenMeta` ``[batch, seq]`` of the new tokens.
      kv_meta: :class:`TokenMeta` ``[batch, kv_len]`` of what is attended to.
      regions: gaze only: :class:`RegionTable` of the keys.
      cache_start: slot where the new keys and values are written in the cache.
      top_k: gaze only: regions per text query (static).
      max_unrouted_tokens: gaze decode only: static bound on a sample's text and context
        tokens in the cache; the xla decode then reads only those and the selected regions.
    """

    cos: jax.Array
    sin: jax.Array
    mask: jax.Array | None
    query_meta: TokenMeta | None
    kv_meta: TokenMeta | None
    regions: RegionTable | None
    cache_start: jax.Array
    top_k: int = flax.struct.field(pytree_node=False, default=1)
    max_unrouted_tokens: int | None = flax.struct.field(pytree_node=False, default=None)


class Attention(nn.Module):
    """Grouped-query self-attention with optional q/k norm (Qwen3) or qkv bias (Qwen2).

    ``config.attention`` picks dense attention or gaze attention (``kernels.gaze_attention``).
    """

    config: DecoderConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, inputs: AttentionInputs, layer_cache: LayerCache | None
    ) -> tuple[jax.Array, LayerCache]:
        """Attends ``x [batch, seq, embed]`` to itself, or to the cache when one is given.

        Returns the output ``[batch, seq, embed]`` and the layer's keys, values and region
        descriptors as attended to (with a cache: the updated, head-major cache entries).
        """
        cfg = self.config
        heads = ("embed", "heads", "head_dim")
        kv_heads = ("embed", "kv_heads", "head_dim")
        q = _dense((cfg.num_heads, cfg.head_dim), heads, cfg.qkv_bias, cfg, "q_proj")(x)
        k = _dense((cfg.num_kv_heads, cfg.head_dim), kv_heads, cfg.qkv_bias, cfg, "k_proj")(x)
        v = _dense((cfg.num_kv_heads, cfg.head_dim), kv_heads, cfg.qkv_bias, cfg, "v_proj")(x)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, "head_dim", name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, "head_dim", name="k_norm")(k)
        pre_rope_k = k
        q = apply_rope(q, inputs.cos, inputs.sin)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = apply_rope(k, inputs.cos, inputs.sin)
        descriptors = self._descriptors(k, pre_rope_k, inputs, layer_cache)
        split = current_sequence_split() if layer_cache is not None else None
        # A decode step reads the cache rows in place (dense: as rows; gaze and a split cache:
        # head-major, a reshape); the many-query paths take it length-major.
        heads_first = layer_cache is not None and q.shape[1] == 1
        if layer_cache is not None:
            k = _written(layer_cache.keys, k, inputs.cache_start)
            v = _written(layer_cache.values, v, inputs.cache_start)
            cached = LayerCache(k, v, descriptors)
            if cfg.attention == "gaze" or not heads_first or split is not None:
                shape = (q.shape[0], cfg.num_kv_heads, *k.shape[1:])
                k, v = k.reshape(shape), v.reshape(shape)
            if not heads_first:
                k, v = (jnp.swapaxes(x, 1, 2) for x in (k, v))
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        if split is not None and q.shape[1] == 1:  # decode over a sequence-split cache
            out, selection = split_decode_step(split, cfg, q, k, v, inputs, descriptors)
            if selection is not None:
                self.sow("intermediates", "selection", selection)
        elif cfg.attention == "dense" and heads_first:
            out = decode_attention(q, k, v, inputs.mask)
        elif cfg.attention == "dense" and inputs.mask is not None:
            out = dense_attention(q, k, v, inputs.mask)
        elif cfg.attention == "dense":
            out = causal_attention(q, k, v, inputs.query_meta, inputs.kv_meta)
        else:
            out, selection = gaze_attention_on_mesh(
                q,
                k,
                v,
                inputs.query_meta,
                inputs.kv_meta,
                inputs.regions,
                top_k=inputs.top_k,
                max_unrouted_tokens=inputs.max_unrouted_tokens if q.shape[1] == 1 else None,
                descriptors=descriptors,
                routing=cfg.gaze_routing,
                implementation=cfg.gaze_implementation,
                return_selection=True,
                heads_first=heads_first,
            )
            self.sow("intermediates", "selection", selection)
        out = _dense(
            cfg.hidden_size,
            ("heads", "head_dim", "embed"),
            cfg.out_bias,
            cfg,
            "o_proj",
            num_in_axes=2,
        )(out)
        return out, cached if layer_cache is not None else LayerCache(k, v, descriptors)

    def _descriptors(self, k, pre_rope_k, inputs, layer_cache):
        """Region descriptors ``[batch, num_regions, kv_heads, head_dim]`` (gaze only).

        Computed from the new tokens' keys when they carry the visual tokens (training, prefill)
        and kept in the cache; a prefill in chunks updates the regions of each chunk and keeps
        the others; a one-token decode step appends text only and reuses them. A cache split
        along its sequence (:mod:`gazejax.models.sequence_split`) is prefilled at once, each
        shard's descriptors from its own keys.
        """
        if self.config.attention == "dense":
            return None
        if layer_cache is not None and k.shape[1] == 1:
            return layer_cache.descriptors
        keys = pre_rope_k if self.config.gaze_descriptor_keys == "pre_rope" else k
        split = current_sequence_split() if layer_cache is not None else None
        if split is not None:  # prefill of a sequence-split cache: per shard
            return split_descriptors(split, keys, inputs, layer_cache.keys.shape[1])
        previous = None if layer_cache is None else layer_cache.descriptors
        return region_descriptors(keys, inputs.query_meta, inputs.regions.num_regions, previous)


def _written(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """The cache rows ``[batch·kv_heads, max_len, d]`` with ``new [batch, seq, kv_heads, d]``
    written at slots ``[start, start + seq)`` (in place when the cache is donated)."""
    new = jnp.swapaxes(new, 1, 2).reshape(cache.shape[0], -1, cache.shape[2])
    return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0, start, 0))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = _dense(cfg.intermediate_size, ("embed", "mlp"), False, cfg, "gate_proj")(x)
        up = _dense(cfg.intermediate_size, ("embed", "mlp"), False, cfg, "up_proj")(x)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return _dense(cfg.hidden_size, ("mlp", "embed"), False, cfg, "down_proj")(hidden)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    config: DecoderConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, inputs: AttentionInputs, layer_cache: LayerCache | None
    ) -> tuple[jax.Array, LayerCache]:
        cfg = self.config

        def norm(name):
            return RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, "embed", name=name)

        attn_out, layer_cache = Attention(cfg, name="self_attn")(
            norm("input_layernorm")(x), inputs, layer_cache
        )
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), layer_cache


class Decoder(nn.Module):
    """The language model: token embedding, ``num_layers`` blocks, final norm, LM head."""

    config: DecoderConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=_param(nn.initializers.normal(0.02), "vocab", "embed"),
        )
        layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
        self.layers = [layer_cls(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, "embed")
        if not cfg.tie_embeddings:
            self.lm_head = _dense(cfg.vocab_size, ("embed", "vocab"), False, cfg, "lm_head")

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings ``[batch, seq, embed]`` of int ``input_ids [batch, seq]``."""
        return self.embed_tokens(input_ids)

    def __call__(
        self,
        input_ids: jax.Array | None,
        positions: jax.Array | None = None,
        *,
        input_mask: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
        token_meta: TokenMeta | None = None,
        regions: RegionTable | None = None,
        top_k: int | None = None,
        max_unrouted_tokens: int | None = None,
        cache: KVCache | None = None,
        logit_slots: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits for a sequence, optionally continuing a KV cache.

        Plain language modelling needs only ``input_ids``. A multimodal sequence passes
        ``inputs_embeds`` and its ``token_meta`` (kinds, units, regions, positions; DESIGN.md
        §2), which then defines the masks; gaze attention also needs ``regions``.

        Args:
          input_ids: int ``[batch, seq]`` (or None when ``inputs_embeds`` is given).
          positions: int ``[batch, seq]`` position ids; default ``token_meta.position``, else
            ``0..seq-1`` after the cache's ``end``.
          input_mask: bool ``[batch, seq]``, False for padding; default ``token_meta``'s
            validity, else all True.
          inputs_embeds: float ``[batch, seq, embed]`` used instead of embedding ``input_ids``.
          token_meta: :class:`TokenMeta` ``[batch, seq]`` of the tokens (stored in the cache).
          regions: :class:`RegionTable` of the sequence (of the cache, when decoding).
          top_k: regions per text query for gaze attention; default ``config.gaze_top_k``.
          max_unrouted_tokens: gaze decode steps: a static bound on the text and context
            tokens per sample in the cache, so that a step reads only those and the selected
            regions (``implementation="xla"`` or ``"pallas"``); None reads everything outside
            the regions.
          cache: a :class:`KVCache`; the tokens are written at slots
            ``[cache.end, cache.end + seq)``. A one-token step is a decode step: it reuses the
            cached region descriptors, so it must not add visual tokens. A gaze prefill may come
            in chunks of whole visual units (with their context tokens; whole frame groups when
            regions span frames): a unit's tokens are stored region-major, so a visual query
            needs its whole unit written, and a region's descriptor is its chunk's mean.

          logit_slots: optional int ``[batch, n]``: compute logits only at these slots of the
            sequence (a prefill needs the last one: the LM head is then ``n / seq`` of the work).

        Returns:
          float32 logits ``[batch, seq or n, vocab]``; with a cache, ``(logits, updated_cache)``.
        """
        cfg = self.config
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.dtype)
        batch, seq = x.shape[:2]
        start = jnp.zeros((), jnp.int32) if cache is None else cache.end
        if token_meta is None:
            if cfg.attention == "gaze":
                raise ValueError("gaze attention needs token_meta and regions")
            mask = jnp.ones((batch, seq), bool) if input_mask is None else input_mask.astype(bool)
            default_positions = start + jnp.arange(seq, dtype=jnp.int32)
            token_meta = text_meta(jnp.broadcast_to(default_positions, (batch, seq)), mask)
        elif input_mask is not None:
            raise ValueError("pass either token_meta or input_mask, not both")
        if positions is not None:
            token_meta = token_meta.replace(position=positions.astype(jnp.int32))
        kv_meta = token_meta if cache is None else cache.write_meta(token_meta, start)
        cos, sin = rope_cos_sin(jnp.maximum(token_meta.position, 0), cfg.head_dim, cfg.rope_theta)
        dense_step = cfg.attention == "dense" and seq == 1  # one query: read the cache at once
        inputs = AttentionInputs(
            cos=cos,
            sin=sin,
            mask=dense_visibility(token_meta, kv_meta) if dense_step else None,
            query_meta=token_meta,
            kv_meta=kv_meta,
            regions=regions if cache is None or regions is not None else cache.regions,
            cache_start=start,
            top_k=cfg.gaze_top_k if top_k is None else top_k,
            max_unrouted_tokens=max_unrouted_tokens,
        )
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        layer_caches = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, inputs, None if cache is None else cache.layers[i])
            layer_caches.append(layer_cache)
        if logit_slots is not None:
            x = jnp.take_along_axis(x, logit_slots[..., None].astype(jnp.int32), axis=1)
        x = self.norm(x)
        if cfg.tie_embeddings:  # table first: XLA:CPU reads it in place (``attend`` copies it)
            table = self.embed_tokens.embedding.astype(cfg.dtype)
            logits = jnp.einsum("vd,bsd->bsv", table, x)
        else:
            logits = self.lm_head(x)
        logits = nn.with_logical_constraint(
            logits.astype(jnp.float32), ("batch", "length", "vocab")
        )
        if cache is None:
            return logits
        return logits, cache.update(layer_caches, kv_meta, inputs.regions, start + seq)


def text_meta(positions: jax.Array, valid: jax.Array) -> TokenMeta:
    """:class:`TokenMeta` of a text-only sequence: positions ``[batch, seq]``, bool ``valid``."""
    kind = jnp.where(valid, TokenKind.TEXT, TokenKind.PADDING).astype(jnp.int32)
    none = jnp.full(positions.shape, -1, jnp.int32)
    return TokenMeta(
        kind=kind,
        unit=none,
        region=none,
        position=jnp.where(valid, positions, -1).astype(jnp.int32),
    )

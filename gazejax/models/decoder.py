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

from gazejax.models.attention import apply_rope, dense_attention, rope_cos_sin
from gazejax.models.layers import Projection

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

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for a fixed number of cache slots.

    Attributes:
      keys, values: one array per layer, each ``[batch, max_len, num_kv_heads, head_dim]``;
        keys are stored as the attention reads them (after the k-norm and RoPE). Per-layer arrays
        let each layer update its slots in place (with buffer donation).
      valid: bool ``[batch, max_len]``, True for slots holding a real (non-padding) token.
      end: int32 scalar, the number of slots written so far (the same for every sample; samples
        of different lengths are left-padded and masked through ``valid``).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    end: jax.Array

    @classmethod
    def empty(cls, config: DecoderConfig, batch: int, max_len: int, dtype: Dtype | None = None):
        shape = (batch, max_len, config.num_kv_heads, config.head_dim)
        dtype = dtype or config.dtype

        def zeros():  # distinct buffers, so that the cache can be donated
            return tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))

        return cls(
            keys=zeros(),
            values=zeros(),
            valid=jnp.zeros((batch, max_len), bool),
            end=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[1]


CACHE_AXES = ("batch", "cache_length", "kv_heads", "head_dim")


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


class Attention(nn.Module):
    """Grouped-query self-attention with optional q/k norm (Qwen3) or qkv bias (Qwen2)."""

    config: DecoderConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        cache_kv: tuple[jax.Array, jax.Array] | None,
        cache_start: jax.Array | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attends ``x [batch, seq, embed]`` to itself, or to the cache when one is given.

        Args:
          cos, sin: RoPE tables ``[batch, seq, head_dim]`` for ``x``'s positions.
          mask: bool ``[batch, seq, kv_len]``; ``kv_len`` is ``seq`` or the cache length.
          cache_kv: this layer's cached ``(keys, values)`` ``[batch, max_len, kv_heads, head_dim]``.
          cache_start: slot where ``x``'s keys and values are written.
        Returns:
          The output ``[batch, seq, embed]`` and the (updated) ``(keys, values)`` attended to.
        """
        cfg = self.config
        q = _dense(
            (cfg.num_heads, cfg.head_dim),
            ("embed", "heads", "head_dim"),
            cfg.qkv_bias,
            cfg,
            "q_proj",
        )(x)
        k = _dense(
            (cfg.num_kv_heads, cfg.head_dim),
            ("embed", "kv_heads", "head_dim"),
            cfg.qkv_bias,
            cfg,
            "k_proj",
        )(x)
        v = _dense(
            (cfg.num_kv_heads, cfg.head_dim),
            ("embed", "kv_heads", "head_dim"),
            cfg.qkv_bias,
            cfg,
            "v_proj",
        )(x)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, "head_dim", name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, "head_dim", name="k_norm")(k)
        q = nn.with_logical_constraint(
            apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim")
        )
        k = apply_rope(k, cos, sin)
        if cache_kv is not None:
            index = (0, cache_start, 0, 0)
            k = jax.lax.dynamic_update_slice(cache_kv[0], k.astype(cache_kv[0].dtype), index)
            v = jax.lax.dynamic_update_slice(cache_kv[1], v.astype(cache_kv[1].dtype), index)
        out = dense_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        out = _dense(
            cfg.hidden_size,
            ("heads", "head_dim", "embed"),
            cfg.out_bias,
            cfg,
            "o_proj",
            num_in_axes=2,
        )(out)
        return out, (k, v)


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
    def __call__(self, x, cos, sin, mask, cache_kv, cache_start):
        cfg = self.config
        def norm(name):
            return RMSNorm(
                    cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, "embed", name=name
                )  # noqa: E731
        attn_out, kv = Attention(cfg, name="self_attn")(
            norm("input_layernorm")(x), cos, sin, mask, cache_kv, cache_start
        )
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), kv


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
        layer_cls = nn.remat(DecoderLayer, static_argnums=()) if cfg.remat else DecoderLayer
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
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits for a sequence, optionally continuing a KV cache.

        Args:
          input_ids: int ``[batch, seq]`` (or None when ``inputs_embeds`` is given).
          positions: int ``[batch, seq]`` position ids; default ``0..seq-1`` (after the cache's
            ``end`` when a cache is given).
          input_mask: bool ``[batch, seq]``, False for padding tokens; default all True.
          inputs_embeds: float ``[batch, seq, embed]`` used instead of embedding ``input_ids``.
          attention_mask: bool ``[batch, seq, kv_len]`` replacing the default causal-and-valid
            mask (``kv_len`` = ``seq``, or the cache length with a cache).
          cache: a :class:`KVCache`; the new tokens are written at slots
            ``[cache.end, cache.end + seq)``.

        Returns:
          float32 logits ``[batch, seq, vocab]``; with a cache, ``(logits, updated_cache)``.
        """
        x = (
            self.embed(input_ids)
            if inputs_embeds is None
            else inputs_embeds.astype(self.config.dtype)
        )
        batch, seq = x.shape[:2]
        input_mask = jnp.ones((batch, seq), bool) if input_mask is None else input_mask.astype(bool)
        start = jnp.zeros((), jnp.int32) if cache is None else cache.end
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        if cache is None:
            key_valid = input_mask
            kv_len = seq
        else:
            key_valid = jax.lax.dynamic_update_slice(cache.valid, input_mask, (0, start))
            kv_len = cache.max_len
        if attention_mask is None:
            query_slot = start + jnp.arange(seq)
            causal = jnp.arange(kv_len)[None, :] <= query_slot[:, None]
            attention_mask = causal[None] & key_valid[:, None, :]
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)

        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            cache_kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, (k, v) = layer(x, cos, sin, attention_mask, cache_kv, start)
            new_keys.append(k)
            new_values.append(v)
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.config.tie_embeddings else self.lm_head(x)
        logits = nn.with_logical_constraint(
            logits.astype(jnp.float32), ("batch", "length", "vocab")
        )
        if cache is None:
            return logits
        cache = KVCache(
            keys=tuple(nn.with_logical_constraint(k, CACHE_AXES) for k in new_keys),
            values=tuple(nn.with_logical_constraint(v, CACHE_AXES) for v in new_values),
            valid=key_valid,
            end=start + seq,
        )
        return logits, cache

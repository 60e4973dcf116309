"""The dense decode steps the benchmark scripts time gaze against (imported as
``dense_reference``: scripts run from this folder)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_decode(query, key, value, cache=None):
    """``[b, 1, h, d]`` query over the whole ``[b, len, kv_heads, d]`` cache: einsum, softmax,
    einsum (``cache`` unused: the signature of the gaze steps it is timed beside)."""
    batch, _, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    q = query[:, 0].reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("bkgd,blkd->bkgl", q, key, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * head_dim**-0.5, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgl,blkd->bkgd", probs, value, preferred_element_type=jnp.float32)
    return out.reshape(query.shape).astype(query.dtype)


def cudnn_decode(query, key, value, cache=None):
    """The same step through cuDNN's fused attention (GPU only; GQA by head broadcast)."""
    return jax.nn.dot_product_attention(query, key, value, implementation="cudnn")

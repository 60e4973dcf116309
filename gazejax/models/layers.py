"""Small building blocks with logical axis names on every parameter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Any


class Projection(nn.Module):
    """A linear map contracting the last ``num_in_axes`` axes of ``x`` into ``features``.

    Like ``nn.DenseGeneral``, but the kernel is initialised at its full shape, so its logical
    axis names (``kernel_axes``: input axes then output axes) hold during ``init`` under a mesh.
    The bias, if any, carries the output axes' names.
    """

    features: Sequence[int]
    kernel_axes: Sequence[str]
    num_in_axes: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = tuple(self.features)
        in_shape = x.shape[x.ndim - self.num_in_axes :]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
            in_shape + features,
            self.param_dtype,
        )
        contract = tuple(range(x.ndim - self.num_in_axes, x.ndim))
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            ((contract, tuple(range(self.num_in_axes))), ((), ())),
        )
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(
                    nn.initializers.zeros, tuple(self.kernel_axes[self.num_in_axes :])
                ),
                features,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


def image_conv(
    features: int,
    kernel: int,
    stride: int,
    padding: str | tuple[tuple[int, int], tuple[int, int]],
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
) -> nn.Conv:
    """A square 2-D convolution over ``[batch, height, width, channels]`` with logical axes
    ``(patch_height, patch_width, channels, embed)`` on its kernel and ``embed`` on its bias."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("patch_height", "patch_width", "channels", "embed")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )

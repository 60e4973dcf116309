"""What every evaluation method is: a :class:`Method` (at a budget) builds a :class:`Runner`,
says what a query reads (``top_k``, ``visual_kv``) and notes or skips itself on a checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import flax.linen as nn
import jax
import numpy as np

from gazejax.gaze.inputs import MultimodalInputs
from gazejax.models.decoder import Attention, AttentionInputs
from gazejax.models.mllm import MultimodalConfig, MultimodalModel

LogitsFn = Callable[..., jax.Array]
"""``(params, inputs, targets, top_k) -> logits [batch, length, vocab]`` (``top_k`` static)."""


@dataclasses.dataclass(frozen=True)
class Runner:
    """How one method packs and scores a batch.

    Attributes:
      method: the method.
      config: the packing and model config.
      logits: see :data:`LogitsFn`.
      details: extra keys of the method's ``results.json`` records (e.g. dense_reduced's pool).
    """

    method: Method
    config: MultimodalConfig
    logits: LogitsFn
    details: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Method:
    """A method at a budget (the fraction of a sample's visual KV entries one answer query
    reads; None for methods without one). Subclasses set the class attributes and override
    :meth:`runner`, and where they differ from dense, the other hooks."""

    budget: float | None = None

    name: ClassVar[str]
    """The name on the command line and in ``results.json``."""
    takes_budget: ClassVar[bool] = False
    """Whether the method runs once per budget (else once, ``budget`` None)."""
    color: ClassVar[tuple[int, int, int]] = (127, 127, 127)
    """Its colour in the plot."""
    reads_context: ClassVar[bool] = True
    """Whether answer queries read the context tokens in the sequence (``context_kv``)."""

    @property
    def label(self) -> str:
        return self.name if self.budget is None else f"{self.name}@{self.budget:g}"

    def runner(self, base: MultimodalConfig) -> Runner:
        """The :class:`Runner` of this method on a checkpoint of config ``base``."""
        raise NotImplementedError

    def note(self, base: MultimodalConfig) -> str | None:
        """A remark for ``results.json``'s ``notes`` about running on ``base``, if any."""
        return None

    def skip_reason(self, base: MultimodalConfig) -> str | None:
        """Why the method cannot run on ``base`` (it is then skipped with this note), if so."""
        return None

    def top_k(self, num_regions: int) -> int | None:
        """Gaze K for a bucket whose samples have at most ``num_regions`` regions; None when
        the method does not route."""
        return None

    def visual_kv(self, num_visual: np.ndarray, top_k: int | None, region_size: int) -> np.ndarray:
        """Visual KV entries one answer query reads, per sample of ``num_visual`` visual tokens
        (``[batch]``; ``region_size``: tokens per region)."""
        return num_visual

    def dense_grid(self, config: MultimodalConfig) -> tuple[int, int]:
        """The token grid of a unit that dense attention reads (``dense_kv_size`` per unit)."""
        return config.projector.output_grid((config.vit.grid, config.vit.grid))


def plain_logits(model: MultimodalModel) -> LogitsFn:
    """:data:`LogitsFn` of one forward of ``model`` (``targets`` unused)."""

    def logits(params, inputs, targets, top_k):
        del targets
        return model.apply({"params": params}, inputs, top_k=top_k)

    return logits


def masked_logits(
    model: MultimodalModel, params, inputs: MultimodalInputs, mask_of: Callable[[int], jax.Array]
) -> jax.Array:
    """Logits ``[batch, length, vocab]`` of a forward of the dense ``model`` whose attention
    layer ``i`` reads the bool mask ``mask_of(i)`` ``[batch, length, length]`` (query, key) in
    place of its own (in its :class:`~gazejax.models.decoder.AttentionInputs`, wherever the
    call passes them)."""

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, Attention):
            return next_fun(*args, **kwargs)
        path = context.module.scope.path
        mask = mask_of(int(next(p for p in path if p.startswith("layers_")).split("_")[1]))

        def masked(value):
            return value.replace(mask=mask) if isinstance(value, AttentionInputs) else value

        args = [masked(a) for a in args]
        return next_fun(*args, **{k: masked(v) for k, v in kwargs.items()})

    with nn.intercept_methods(interceptor):
        return model.apply({"params": params}, inputs)

"""The optimizer: AdamW with warm-up + cosine, global-norm clipping, regex parameter groups.

big_vision style: regular expressions over ``/``-joined parameter paths decide what trains and at
which learning-rate multiplier, so stage 1 (projector and context tokens) and stage 2 (all) are
config choices, not code paths. Frozen parameters get no optimizer state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import optax

FROZEN = "frozen"


def path_name(path: tuple) -> str:
    """``/``-joined name of a pytree path, e.g. ``decoder/layers_0/mlp/up_proj/kernel``."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def group_labels(
    params, trainable: Sequence[str], lr_multipliers: Mapping[str, float]
) -> tuple[dict, dict[str, float]]:
    """Labels every parameter with its group; returns ``(labels tree, {group: multiplier})``.

    A parameter trains when its path fully matches one of ``trainable``; its multiplier is the
    first ``lr_multipliers`` pattern it fully matches (default 1.0). A multiplier of 0 freezes.

    Raises:
      ValueError: a ``trainable`` pattern matches no parameter (a typo would silently freeze).
    """
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for pattern in trainable:
        if not any(re.fullmatch(pattern, n) for n in names):
            raise ValueError(f"optim.trainable pattern {pattern!r} matches no parameter")
    multipliers = {FROZEN: 0.0}

    def label(path, _):
        name = path_name(path)
        if not any(re.fullmatch(p, name) for p in trainable):
            return FROZEN
        for pattern, mult in lr_multipliers.items():
            if re.fullmatch(pattern, name):
                if mult == 0:
                    return FROZEN
                group = f"lr_x{mult:g}"
                multipliers[group] = float(mult)
                return group
        multipliers["lr_x1"] = 1.0
        return "lr_x1"

    return jax.tree_util.tree_map_with_path(label, params), multipliers


def frozen_parameters(
    params, trainable: Sequence[str], lr_multipliers: Mapping[str, float] | None = None
):
    """A tree of bools like ``params``: True where a parameter is frozen (see
    :func:`group_labels`)."""
    labels, _ = group_labels(params, trainable, lr_multipliers or {})
    return jax.tree.map(lambda label: label == FROZEN, labels)


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, end_fraction: float = 0.0):
    """Linear warm-up from 0 to ``peak``, then cosine decay to ``peak * end_fraction``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=peak * end_fraction,
    )


def make_optimizer(
    params,
    *,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.95,
    clip_norm: float | None = 1.0,
    trainable: Sequence[str] = (".*",),
    lr_multipliers: Mapping[str, float] | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW over the trainable groups; returns ``(optimizer, base learning-rate schedule)``.

    Gradients of frozen parameters are dropped before clipping, so the clipped global norm is
    the trainable parameters' norm. Weight decay applies to parameters with ``ndim >= 2``.
    """
    labels, multipliers = group_labels(params, trainable, lr_multipliers or {})
    schedule = warmup_cosine(learning_rate, warmup_steps, total_steps)
    frozen = jax.tree.map(lambda label: label == FROZEN, labels)

    def group(mult: float) -> optax.GradientTransformation:
        return optax.chain(
            optax.scale_by_adam(b1=b1, b2=b2),
            optax.add_decayed_weights(
                weight_decay, mask=lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)
            ),
            optax.scale_by_learning_rate(lambda step: schedule(step) * mult),
        )

    transforms = {name: group(m) for name, m in multipliers.items() if name != FROZEN}
    transforms[FROZEN] = optax.set_to_zero()
    chain = [optax.masked(optax.set_to_zero(), frozen)]
    if clip_norm:
        chain.append(optax.clip_by_global_norm(clip_norm))
    chain.append(optax.multi_transform(transforms, labels))
    return optax.chain(*chain), schedule

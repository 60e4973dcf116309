"""How much of the visual KV cache gaze reads: K over training (the progressive schedule) and
the visual KV entries one text query attends to (paper sec. 3.5)."""

from __future__ import annotations

from kernels.gaze_attention.routing import validate_top_k


def progressive_top_k(step: int, *, start: int, target: int, decay_steps: int) -> int:
    """K at training ``step``: ``start`` (all regions) falling linearly to ``target``.

    ``K(step) = round(start + (target - start) · min(step / decay_steps, 1))``. K is a static
    shape, so each distinct value compiles once; ``start - target + 1`` values at most.
    """
    validate_top_k(target)
    if start < target:
        raise ValueError(f"progressive top_k start ({start}) must be >= top_k ({target})")
    if decay_steps <= 0:
        return target
    fraction = min(max(step, 0) / decay_steps, 1.0)
    return int(round(start + (target - start) * fraction))


def gaze_kv_size(
    top_k: int,
    region_size: int,
    num_context_tokens: int,
    num_units: int,
    num_regions: int | None = None,
) -> int:
    """Visual KV entries one text query attends to: ``K·m + |C|·U``.

    ``K`` is capped at ``num_regions`` when given (fewer regions than K: all are taken). Compare
    with the dense count, the number of visual tokens.
    """
    validate_top_k(top_k)
    if region_size < 1:
        raise ValueError(f"region_size (tokens per region) must be >= 1, got {region_size}")
    if num_context_tokens < 0:
        raise ValueError(f"num_context_tokens must be >= 0, got {num_context_tokens}")
    k = top_k if num_regions is None else min(top_k, num_regions)
    return k * region_size + num_context_tokens * num_units

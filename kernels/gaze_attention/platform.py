"""Which Pallas backend a kernel compiles for, and whether it runs in the interpreter.

The kernels choose at trace time (their tiling and their XLA-side work lists depend on it), from
an explicit ``backend`` or ``jax.default_backend()``: ``"tpu"`` compiles with Mosaic,
``"gpu"``/``"cuda"``/``"triton"`` with Triton, and ``"cpu"`` runs the interpreter. An explicit
backend lets a CPU-only host compile for a device it does not have (``tests/aot``).
"""

from __future__ import annotations

from typing import Literal

import jax

Backend = Literal["tpu", "cpu", "gpu", "cuda", "triton"]
Compiler = Literal["mosaic", "triton"]


def compiler_for(backend: Backend | None) -> Compiler:
    """The Pallas compiler of ``backend`` (default ``jax.default_backend()``); on CPU the one
    whose kernel the interpreter runs (Mosaic's)."""
    backend = backend or jax.default_backend()
    if backend in ("tpu", "cpu"):
        return "mosaic"
    if backend in ("gpu", "cuda", "triton"):
        return "triton"
    raise ValueError(f"backend must be tpu, cpu, gpu, cuda or triton, got {backend!r}")


def interprets(interpret: bool | None) -> bool:
    """``interpret``, by default whether JAX's default backend is the CPU."""
    return jax.default_backend() == "cpu" if interpret is None else bool(interpret)

"""Which Pallas backend a kernel compiles for, whether it runs in the interpreter, and the
precision of its dots.

The kernels choose at trace time (their tiling and their XLA-side work lists depend on it), from
an explicit ``backend`` or :func:`target_platform` (the platform of the mesh set by
``jax.set_mesh``, else ``jax.default_backend()``): ``"tpu"`` compiles with Mosaic,
``"gpu"``/``"cuda"``/``"triton"`` with Triton, and ``"cpu"`` runs the interpreter. An explicit
backend, or a mesh of a deviceless topology, lets a CPU-only host compile for a device it does
not have (``tests/aot``), and an explicit backend lets a GPU interpret the TPU kernel (the tests
check both variants everywhere).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

Backend = Literal["tpu", "cpu", "gpu", "cuda", "triton"]
Compiler = Literal["mosaic", "triton"]


def target_platform() -> str:
    """The platform the kernels compile for by default: that of the devices of the mesh set by
    ``jax.set_mesh`` (a deviceless TPU topology's mesh on a CPU host: ``"tpu"``), else
    ``jax.default_backend()``."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return jax.default_backend() if device is None else device.platform


def compiler_for(backend: Backend | None) -> Compiler:
    """The Pallas compiler of ``backend`` (default :func:`target_platform`); on CPU the one
    whose kernel the interpreter runs (Mosaic's)."""
    backend = backend or target_platform()
    if backend in ("tpu", "cpu"):
        return "mosaic"
    if backend in ("gpu", "cuda", "triton"):
        return "triton"
    raise ValueError(f"backend must be tpu, cpu, gpu, cuda or triton, got {backend!r}")


def interprets(interpret: bool | None, compiler: Compiler) -> bool:
    """``interpret``, by default whether the target devices (:func:`target_platform`) cannot
    run ``compiler``'s kernels natively (a CPU runs none; a GPU runs Triton's, a TPU Mosaic's)."""
    if interpret is not None:
        return bool(interpret)
    native = {"gpu": "triton", "cuda": "triton", "tpu": "mosaic"}.get(target_platform())
    return compiler != native


def dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """``a·b`` inside a kernel, contracting ``a``'s axis ``contract[0]`` with ``b``'s
    ``contract[1]``, accumulated in float32. Float32 operands multiply at ``HIGHEST`` precision
    (Triton would use TF32, Mosaic bfloat16 passes); bfloat16 ones at their own."""
    exact = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, precision=exact, preferred_element_type=jnp.float32)

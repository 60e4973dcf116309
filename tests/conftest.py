"""Test-session settings.

Float32 matmuls run at full precision on every backend. XLA on GPUs (and TPUs) otherwise
multiplies float32 at TF32 / bfloat16-pass precision by default, so a float32 reference (the
masked dense oracle, ``jax.nn.dot_product_attention``, the model's einsums) would differ from an
exact computation by 1e-4–1e-3, and the suite's 1e-5 float32 tolerances would measure the
backend's default instead of the code. On the CPU this changes nothing. The Pallas kernels set
their dots' precision themselves (float32 operands at ``HIGHEST``).
"""

import jax

jax.config.update("jax_default_matmul_precision", "highest")

"""Models sharded over a simulated 8-device CPU mesh give the unsharded result.

The mesh needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is imported, so
the check runs in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gazejax.models.decoder import Decoder, DecoderConfig
    from gazejax.sharding import DEFAULT_LOGICAL_AXIS_RULES, make_mesh
    from tests.tolerances import assert_close_accumulated

    assert jax.device_count() == 8, jax.devices()
    config = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8)
    model = Decoder(config)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 8)), jnp.int32)
    init = lambda: model.init(jax.random.key(0), ids)
    reference = model.apply(nn.unbox(init()), ids)

    mesh = make_mesh((2, 2, 2, 1))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES):
        abstract = jax.eval_shape(init)
        shardings = nn.logical_to_mesh_sharding(
            nn.get_partition_spec(abstract), mesh, DEFAULT_LOGICAL_AXIS_RULES)
        variables = jax.jit(init, out_shardings=shardings)()
        q_kernel = variables["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
        assert q_kernel.value.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
        logits = jax.jit(model.apply)(nn.unbox(variables), ids)
    assert_close_accumulated(logits, reference)
    print("SHARDED_OK")
    """
)


def test_decoder_on_simulated_8_device_mesh():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SHARDED_OK" in result.stdout

"""A gaze training step with the Pallas kernels on a mesh equals the single-device step.

Data, fsdp and tensor splits and a context-parallel (sequence) split of a tiny gaze decoder:
the loss and every gradient equal the one-device step's, and the compiled step never
all-gathers the full KV (every sample, every head) or the full activations: the kernels run
under ``shard_map`` on each device's slice (``kernels/gaze_attention/sharded_train.py``).

The mesh needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is imported,
so the check runs in a subprocess. LLVM's optimisation level 0 there halves the compile time of
the interpreted kernels (XLA's HLO passes, and so the HLO checked, are unchanged).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import dataclasses, re
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gazejax.gaze.regions import TextSegment, VisualSegment, batch_layouts, build_layout
    from gazejax.losses import cross_entropy
    from gazejax.models.decoder import Decoder, DecoderConfig
    from gazejax.sharding import DEFAULT_LOGICAL_AXIS_RULES, make_mesh
    from kernels.gaze_attention import gaze_attention
    from kernels.gaze_attention.sharded_train import sharded_gaze_attention
    from tests.tolerances import assert_close_accumulated

    assert jax.device_count() == 8, jax.devices()
    config = DecoderConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                           num_heads=4, num_kv_heads=2, head_dim=8, attention="gaze",
                           gaze_top_k=2, gaze_implementation="pallas")
    batch, length = 8, 32
    samples = [  # regions and units straddle the sequence shards' boundaries (16 or 8 slots)
        [TextSegment(3), VisualSegment(4, 4), TextSegment(5)],
        [TextSegment(2), VisualSegment(2, 4), TextSegment(2), VisualSegment(2, 2), TextSegment(4)],
        [TextSegment(5), VisualSegment(2, 2, frames=2), TextSegment(6)],
        [TextSegment(12)],
    ]
    layouts = [build_layout(samples[i % 4], (2, 2), 2) for i in range(batch)]
    meta, regions = batch_layouts(layouts, length=length)
    rng = np.random.default_rng(0)
    embeds = jnp.asarray(rng.standard_normal((batch, length, 16)), jnp.float32)
    targets = rng.integers(0, 32, (batch, length))
    targets = jnp.asarray(np.where(rng.random((batch, length)) < 0.7, targets, -1), jnp.int32)
    inputs = (embeds, meta, regions, targets)
    model = Decoder(config)

    def init():  # gaze adds no parameters; dense initialises without compiling the kernels
        dense = Decoder(dataclasses.replace(config, attention="dense"))
        return dense.init(jax.random.key(0), None, inputs_embeds=embeds, token_meta=meta)

    def loss(params, embeds, meta, regions, targets):
        logits = model.apply({"params": params}, None, inputs_embeds=embeds, token_meta=meta,
                             regions=regions)
        return cross_entropy(logits, targets)[0]

    step = jax.jit(jax.value_and_grad(loss))
    params = nn.unbox(jax.jit(init)())["params"]
    want = step(params, *inputs)

    def all_gathers(hlo):
        # Result shapes of every all-gather (tuple results: each element).
        results = re.findall(r"= (\\(?[^=]*?\\)?) all-gather(?:-start)?\\(", hlo)
        return [tuple(int(d) for d in dims.split(",") if d)
                for r in results for dims in re.findall(r"[a-z0-9]+\\[([0-9,]*)\\]", r)]

    full = batch * length * config.num_kv_heads * config.head_dim  # = batch·length·hidden
    assert full == batch * length * config.hidden_size
    for shape in [(8, 1, 1, 1), (2, 2, 2, 1), (2, 1, 2, 2)]:
        mesh = make_mesh(shape)
        rules = DEFAULT_LOGICAL_AXIS_RULES
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            specs = nn.get_partition_spec(jax.eval_shape(init)["params"])
            sharded = jax.device_put(params, nn.logical_to_mesh_sharding(specs, mesh, rules))
            compiled = step.lower(sharded, *inputs).compile()
            got = compiled(sharded, *inputs)
        for path, a, b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(got),
                              jax.tree.leaves(want)):
            assert_close_accumulated(a, b, f"{shape} {jax.tree_util.keystr(path[0])}", rtol=1e-5)
        gathers = all_gathers(compiled.as_text())
        assert all(np.prod(g) < full for g in gathers), (shape, gathers)
        if shape[3] > 1:  # context parallel: K and V of the device's samples and heads
            assert gathers.count((batch // 2, length, 1, config.head_dim)) == 2, gathers
        print(shape, "max all-gather", max(map(np.prod, gathers), default=0), "of", full)

    # KV heads that do not divide the tensor axis are replicated over it (a GQA group is never
    # split), with the sequence split; the reference implementation, gradients in q, k, v.
    q, k, v = (jnp.asarray(rng.standard_normal((batch, length, h, 8)), jnp.float32)
               for h in (2, 1, 1))
    options = dict(top_k=2, implementation="reference")

    def attend_loss(attend):
        def f(q, k, v):
            out, _ = attend(q, k, v, meta, meta, regions, **options)
            return jnp.sum(out * q)
        return jax.jit(jax.value_and_grad(f, (0, 1, 2)))

    want = attend_loss(lambda *a, **o: gaze_attention(*a, **o, return_selection=True))(q, k, v)
    mesh = make_mesh((1, 1, 2, 4))
    split = lambda *a, **o: sharded_gaze_attention(  # noqa: E731
        *a, mesh=mesh, batch_axes=("data", "fsdp"), head_axes="tensor",
        sequence_axis="sequence", **o)
    with jax.set_mesh(mesh):
        got = attend_loss(split)(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close_accumulated(a, b, "replicated heads", rtol=1e-5)
    print("SHARDED_TRAIN_OK")
    """
)


def test_pallas_training_step_on_meshes_equals_one_device():
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = dict(
        os.environ,
        XLA_FLAGS=f"{flags} --xla_llvm_disable_expensive_passes=true",
        JAX_PLATFORMS="cpu",
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=dict(env, PYTHONPATH=root),
        timeout=600,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SHARDED_TRAIN_OK" in result.stdout, result.stdout

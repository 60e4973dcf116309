"""The Cambrian configs build abstractly (no weights) and shard on a simulated 8-device mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, math, sys
    import flax.linen as nn
    import jax
    sys.path.insert(0, ".")
    from configs import cambrian_4b_image, cambrian_4b_video, cambrian_7b_video
    from gazejax.models.from_config import multimodal_config
    from gazejax.gaze.inputs import MultimodalInputs
    from gazejax.models.mllm import MultimodalModel
    from gazejax.sharding import make_mesh

    assert jax.device_count() == 8
    name, variant = sys.argv[1], sys.argv[2]
    module = {"4b_image": cambrian_4b_image, "4b_video": cambrian_4b_video,
              "7b_video": cambrian_7b_video}[name]
    config = module.get_config(variant)
    model_config = multimodal_config(config.model)
    bucket = config.data.buckets.all
    inputs = MultimodalInputs.abstract(model_config.geometry, 8, bucket.length, bucket.max_units,
                                       bucket.num_regions)
    mesh = make_mesh((1, 8, 1, 1))
    rules = [tuple(r) for r in config.logical_axis_rules]
    rules = [(n, tuple(a) if isinstance(a, list) else a) for n, a in rules]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables = jax.eval_shape(MultimodalModel(model_config).init, jax.random.key(0), inputs)
        specs = nn.get_partition_spec(variables["params"])
        shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    counts = {}
    for part in ("vision", "projector", "decoder"):
        leaves = jax.tree.leaves(variables["params"][part],
                                 is_leaf=lambda x: isinstance(x, nn.Partitioned))
        counts[part] = sum(math.prod(x.value.shape) for x in leaves)
    embedding = variables["params"]["decoder"]["embed_tokens"]["embedding"]
    per_device = shardings["decoder"]["embed_tokens"]["embedding"].shard_shape(
        embedding.value.shape)
    print(json.dumps({"counts": counts, "embed_shard": per_device}))
    """
)

EXPECTED = {  # parameters, from the public model cards' architectures
    "4b_image": {"decoder": (4.0e9, 4.05e9)},
    "4b_video": {"decoder": (4.0e9, 4.05e9)},
    "7b_video": {"decoder": (7.6e9, 7.65e9)},
}


@pytest.mark.parametrize(
    "name,variant",
    [
        ("4b_image", "stage=2,attention=gaze"),
        ("4b_video", "stage=1"),
        ("7b_video", "stage=2,attention=gaze"),
    ],
)
def test_cambrian_config_builds_abstractly_and_shards(name, variant):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, name, variant],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    counts = report["counts"]
    print(name, {k: f"{v / 1e6:.1f}M" for k, v in counts.items()})
    low, high = EXPECTED[name]["decoder"]
    assert low <= counts["decoder"] <= high
    assert 4.0e8 <= counts["vision"] <= 4.3e8  # SigLIP So400m without its pooling head
    assert report["embed_shard"][1] * 8 == (2560 if name.startswith("4b") else 3584)

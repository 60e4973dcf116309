"""``init_from`` on a mesh: a stage-1 workdir's parameters and a converted vision tower load
straight into the model's sharded layout (8 simulated devices, FSDP over all): every restored
parameter carries its target ``NamedSharding`` and the stored values; nothing is fetched to one
host (no ``jax.device_get``, which fails across hosts)."""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from tests.simulated_devices import FAST_COMPILE, print_results, run_checks, run_script

NUM_DEVICES = 8


def test_init_from_restores_into_the_target_shardings(tmp_path):
    results = run_script(__file__, NUM_DEVICES, [str(tmp_path)], xla_flags=FAST_COMPILE)
    failed = {name: trace for name, trace in results.items() if trace != "ok"}
    assert not failed, "\n".join(failed.values())
    assert set(results) == {"workdir", "vision"}


def _sharded_params(model, geometry, mesh):
    """The model's parameters (random), in their FSDP shardings, and those shardings."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from gazejax.gaze.inputs import MultimodalInputs
    from gazejax.sharding import DEFAULT_LOGICAL_AXIS_RULES

    abstract = MultimodalInputs.abstract(geometry, NUM_DEVICES, 32, 1, 4)
    inputs = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES):
        boxed = jax.eval_shape(model.init, jax.random.key(0), inputs)["params"]
        shardings = nn.logical_to_mesh_sharding(
            nn.get_partition_spec(boxed), mesh, DEFAULT_LOGICAL_AXIS_RULES
        )
        init = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), inputs))["params"])
        params = jax.jit(init, out_shardings=shardings)()
    return params, shardings


def _same(restored, shardings, want) -> None:
    """``restored`` has ``want``'s values in ``shardings``, some split across devices."""
    import jax

    assert not all(s.is_fully_replicated for s in jax.tree.leaves(shardings))
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored):
        target = dict(jax.tree_util.tree_leaves_with_path(shardings))[path]
        assert leaf.sharding == target, (path, leaf.sharding, target)
        expected = dict(jax.tree_util.tree_leaves_with_path(want))[path]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected), err_msg=str(path))


def check_workdir(root: pathlib.Path, model, params, shardings) -> None:
    import jax
    import jax.numpy as jnp

    from gazejax.checkpointing import Checkpointer
    from gazejax.init_from import load_workdir_params

    stage1 = jax.tree.map(lambda x: np.asarray(x) + 1.0, params)  # host arrays, other values
    checkpointer = Checkpointer(str(root / "stage1"), every_steps=1, max_to_keep=1)
    checkpointer.save(3, {"step": jnp.int32(3), "params": stage1, "opt_state": {}}, {}, {})
    checkpointer.close()
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
    )
    _same(load_workdir_params(str(root / "stage1"), abstract), shardings, stage1)


def check_vision(root: pathlib.Path, model, params, shardings) -> None:
    import jax

    from gazejax.convert.native import save_gazejax
    from gazejax.init_from import init_from_checkpoints
    from gazejax.models.vit import VisionTransformer

    vision = jax.tree.map(lambda x: np.asarray(x) * 2.0, params["vision"])
    save_gazejax(VisionTransformer(model.config.vit), vision, root / "vit")
    loaded = init_from_checkpoints(params, {"vision": str(root / "vit")}, model.config)
    _same(loaded["vision"], shardings["vision"], vision)


if __name__ == "__main__":
    from gazejax.models.from_config import multimodal_config
    from gazejax.models.mllm import MultimodalModel
    from gazejax.sharding import make_mesh
    from tests.workdirs import tiny_gaze_config

    root = pathlib.Path(sys.argv[1])
    model = MultimodalModel(multimodal_config(tiny_gaze_config().model))
    mesh = make_mesh([1, NUM_DEVICES, 1, 1])
    params, shardings = _sharded_params(model, model.config.geometry, mesh)
    args = (model, params, shardings)
    print_results(
        run_checks({"workdir": (check_workdir, root, *args), "vision": (check_vision, root, *args)})
    )

"""Decoding with the KV cache split along its sequence over 8 simulated devices equals the
single-device decode: the same tokens and selections for one image, and for two images with a
video whose cache does not divide by 8 (gaze and dense); each device holds 1/8 of the cache, and
a decode step's only collectives are the top-K exchange and the log-sum-exp merge. ``evaluate``'s
sweep over the mesh scores as one device does.

The mesh needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is imported, so
the checks run in one subprocess (this file run as a script) and report back as JSON.
"""

from __future__ import annotations

import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from lmms_eval.api.instance import Instance
from PIL import Image

from gazejax.data.vocab import build_tokenizer
from gazejax.eval.methods import parse_methods
from gazejax.eval.sweep import sweep
from gazejax.inference import Checkpoint, build_prompt, decode, generate_answer, with_attention
from gazejax.inference.sequence_parallel import shard_prompt
from gazejax.lmms.model import GazeJaxLMM
from gazejax.models.from_config import multimodal_config
from gazejax.models.mllm import MultimodalModel
from gazejax.sharding import make_mesh, mesh_rules, parse_mesh
from tests.simulated_devices import iter_eqns, print_results, run_checks, run_script
from tests.workdirs import save_workdir, tiny_gaze_config

NUM_DEVICES = 8
TOP_K = 2
NEW_TOKENS = 4


def tiny_model(attention: str):
    """The tiny gaze model of ``tests.workdirs`` (4×4 tokens per unit, regions of 2×2, 2
    layers, 4/2 heads × 8), with ``attention``."""

    config = with_attention(multimodal_config(tiny_gaze_config().model), attention)
    return MultimodalModel(config)


def random_params(model, inputs, seed: int = 0):
    """Normal random parameters of ``model``'s shapes (no compiled init: faster here)."""

    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), inputs))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), s.dtype), shapes)


# ----------------------------------------------------------------------------------------------
# Mesh checks (run in the subprocess, on NUM_DEVICES simulated CPU devices).


def build_prompts(config):
    """One image, and two images with a 5-frame video (a cache that does not divide by 8)."""

    rng = np.random.default_rng(1)
    size = config.vit.image_size

    def visual(frames):
        return rng.uniform(-1, 1, (frames, size, size, 3)).astype(np.float32)

    tokenizer = build_tokenizer()
    mixed = [visual(1), visual(1), visual(5)]
    return {
        "one image": build_prompt(config, tokenizer, "what color?", [visual(1)], ""),
        "two images and a video": build_prompt(
            config, tokenizer, "<image> <image> which moves in <image>?", mixed, pad_multiple=1
        ),
    }


def check_decode(attention: str, prompt, mesh, cache_checks: bool = False) -> None:
    """Same tokens and selections on one device and with the cache split 8 ways."""

    model = tiny_model(attention)
    params = random_params(model, prompt.inputs)
    top_k = TOP_K if attention == "gaze" else None
    single = generate_answer(model, params, prompt, NEW_TOKENS, top_k=top_k, eos_id=-1)
    split = generate_answer(model, params, prompt, NEW_TOKENS, top_k=top_k, eos_id=-1, mesh=mesh)
    np.testing.assert_array_equal(split.token_ids, single.token_ids)
    assert len(single.token_ids) == NEW_TOKENS
    if attention == "dense":
        assert split.selections is None and single.selections is None
        return
    np.testing.assert_array_equal(split.selections, single.selections)
    assert (single.selections >= 0).any() and len(np.unique(single.selections)) > 2
    if cache_checks:
        check_cache_split(model, params, prompt, mesh)


def check_cache_split(model, params, prompt, mesh) -> None:
    """Each device holds 1/8 of every layer's keys, values and descriptors, and a decode step
    runs the sharded decode: per layer, one all-gather of top-k candidates and the
    log-sum-exp merge's pmax and psum, nothing cache-sized."""

    sharded = shard_prompt(prompt, NUM_DEVICES, room=NEW_TOKENS)
    assert (prompt.length + NEW_TOKENS) % NUM_DEVICES, "the cache divides by 8"
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    with mesh_rules(mesh):
        _, cache, _ = decode._prefill(  # compiled by generate_answer already
            model,
            params,
            sharded.prompt.inputs,
            jnp.int32(sharded.prompt.last_slot),
            top_k=TOP_K,
            max_len=sharded.prompt.length,
        )
        for layer in cache.layers:
            for array in (layer.keys, layer.values, layer.descriptors):
                shards = array.addressable_shards
                assert len(shards) == NUM_DEVICES
                assert {x.data.shape[1] for x in shards} == {array.shape[1] // NUM_DEVICES}
                assert len({x.index[1].start for x in shards}) == NUM_DEVICES, array.sharding
        step = jax.make_jaxpr(
            lambda cache: decode._step(
                model,
                params,
                jnp.int32(1),
                jnp.int32(prompt.next_position),
                cache,
                top_k=TOP_K,
                max_unrouted_tokens=prompt.num_unrouted + NEW_TOKENS,
            )
        )(cache)
    heads = model.config.decoder.num_heads
    local_k = min(TOP_K, cache.regions.num_regions // NUM_DEVICES)
    found = sorted(
        (eqn.primitive.name, tuple(eqn.invars[0].aval.shape))
        for eqn in iter_eqns(step.jaxpr)
        if eqn.primitive.name in COLLECTIVES
    )
    per_layer = [
        ("all_gather", (1, 1, heads, local_k, 2)),
        ("pmax", (1, 1, heads)),
        ("psum", (1, 1, heads, model.config.decoder.head_dim + 1)),
    ]
    assert found == sorted(per_layer * model.config.decoder.num_layers), found


COLLECTIVES = {"all_gather", "psum", "pmax", "ppermute", "all_to_all", "psum_scatter"}


def check_evaluate(mesh, root) -> None:
    """``evaluate``'s sweep over the mesh scores a JSONL benchmark (one image, three options)
    as one device does."""

    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(f"{root}/a.png")
    line = {
        "id": "q",
        "question": "what color is the square?",
        "image": "a.png",
        "options": ["red", "blue", "green"],
        "answer": "B",
    }
    with open(f"{root}/bench.jsonl", "w") as f:
        f.write(json.dumps(line) + "\n")
    raw = json.loads(tiny_gaze_config().to_json_best_effort())
    model = tiny_model("gaze")
    tokenizer = build_tokenizer()
    size = model.config.vit.image_size
    inputs = build_prompt(model.config, tokenizer, "x", [np.zeros((1, size, size, 3))]).inputs
    checkpoint = Checkpoint(model.config, random_params(model, inputs), tokenizer, "", 2)
    options = dict(
        methods=parse_methods(["gaze"], [0.5]),
        examples=1,
        benchmarks=[f"jsonl:{root}/bench.jsonl:mini"],
        batch_size=4,
        progress=False,
    )
    single = sweep(checkpoint, raw, **options)
    split = sweep(checkpoint, raw, mesh=mesh, **options)
    for a, b in zip(single["records"], split["records"], strict=True):
        del a["seconds"], b["seconds"]
        assert_same(b, a)
    assert single["records"][0]["per_example"], "no per-example scores compared"


def check_lmms(prompt, root) -> None:
    """The lmms-eval model with ``mesh=sequence=8`` answers as on one device (the one-image
    prompt's shapes: the decode is compiled already)."""
    model = tiny_model("gaze")
    workdir = pathlib.Path(root) / "lmms"
    workdir.mkdir()
    save_workdir(workdir, tiny_gaze_config(), random_params(model, prompt.inputs))
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), np.uint8))
    args = ("what color?", {"max_new_tokens": NEW_TOKENS}, lambda doc: [image], 0, "t", "test")
    metadata = {"task": "t", "doc_id": 0, "repeats": 1}
    request = Instance("generate_until", args, idx=0, metadata=metadata)
    answers = []
    for mesh in (None, "sequence=8"):
        lm = GazeJaxLMM(workdir=str(workdir), top_k=TOP_K, mesh=mesh)
        lm.task_dict = {"t": {"test": [{}]}}
        answers += lm.generate_until([request])
    assert answers[0] == answers[1] and answers[0], answers


def assert_same(actual, expected, where: str = "") -> None:
    """Equal nested records, floats to 1e-5."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (x, y) in enumerate(zip(actual, expected, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(expected, float):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5, err_msg=where)
    else:
        assert actual == expected, where


def run_mesh_checks() -> dict[str, object]:

    assert jax.device_count() == NUM_DEVICES, jax.devices()
    mesh = make_mesh(parse_mesh("sequence=8"))
    model = tiny_model("gaze")
    prompts = build_prompts(model.config)
    checks = {
        "one image [gaze]": (check_decode, "gaze", prompts["one image"], mesh),
        "two images and a video [gaze]": (
            check_decode,
            "gaze",
            prompts["two images and a video"],
            mesh,
            True,
        ),
        "two images and a video [dense]": (
            check_decode,
            "dense",
            prompts["two images and a video"],
            mesh,
        ),
        "evaluate": (check_evaluate, mesh, sys.argv[1]),
        "lmms-eval generate_until": (check_lmms, prompts["one image"], sys.argv[1]),
    }
    return run_checks(checks)


MESH_CHECKS = (
    "one image [gaze]",
    "two images and a video [gaze]",
    "two images and a video [dense]",
    "evaluate",
    "lmms-eval generate_until",
)


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    return run_script(__file__, NUM_DEVICES, [str(tmp_path_factory.mktemp("bench"))])


@pytest.mark.parametrize("name", MESH_CHECKS)
def test_on_8_devices(mesh_results, name):
    assert mesh_results[name] == "ok", mesh_results[name]


if __name__ == "__main__":
    print_results(run_mesh_checks())


# ----------------------------------------------------------------------------------------------
# In process: the mesh flag, the decode's mesh check, the sharded prompt.


def test_mesh_flag_is_the_config_mesh_shape():
    assert parse_mesh("sequence=8") == (1, 1, 1, 8)
    assert parse_mesh("data=2, sequence=-1", device_count=8) == (2, 1, 1, 4)
    for bad in ("seq=8", "sequence", "sequence=x", "data=-1,sequence=-1", "sequence=0"):
        with pytest.raises(ValueError, match="--mesh"):
            parse_mesh(bad)


def test_decode_splits_the_sequence_axis_only():
    from gazejax.inference.sequence_parallel import decode_shards
    from gazejax.sharding import MESH_AXES

    assert decode_shards(jax.sharding.AbstractMesh((1, 1, 1, 8), MESH_AXES)) == 8
    with pytest.raises(ValueError, match="'sequence' only"):
        decode_shards(jax.sharding.AbstractMesh((2, 1, 1, 4), MESH_AXES))


def test_generate_cli_names_the_mesh_it_cannot_build(capsys):
    from gazejax import generate as generate_cli

    argv = ["--checkpoint", "nowhere", "--image", "x.png", "--prompt", "q", "--mesh", "sequence=8"]
    assert generate_cli.main(argv) == 1
    assert "needs 8 devices" in capsys.readouterr().err


def test_sharded_prompt_moves_every_token_and_leaves_room():
    config = tiny_model("gaze").config
    prompt = build_prompts(config)["two images and a video"]
    sharded = shard_prompt(prompt, NUM_DEVICES, room=NEW_TOKENS)
    old, new = prompt.inputs, sharded.prompt.inputs
    length = sharded.prompt.length
    assert length % NUM_DEVICES == 0 and length >= prompt.length + NEW_TOKENS

    # Every real token (by position) keeps its id, visual/context index, kind and unit.
    def by_position(inputs):
        position = np.asarray(inputs.meta.position[0])
        columns = (inputs.input_ids, inputs.visual_index, inputs.context_index, inputs.meta.kind)
        return {
            int(p): tuple(int(np.asarray(c)[0, i]) for c in columns)
            for i, p in enumerate(position)
            if p >= 0
        }

    assert by_position(new) == by_position(old)
    # Region ids map back: the region at each position, through region_ids, is the old one.
    old_region = {
        int(p): int(r)
        for p, r in zip(old.meta.position[0], old.meta.region[0], strict=True)
        if r >= 0
    }
    new_region = {
        int(p): int(r)
        for p, r in zip(new.meta.position[0], new.meta.region[0], strict=True)
        if r >= 0
    }
    assert new_region.keys() == old_region.keys()
    ids = np.asarray(list(new_region.values()))
    mapped = sharded.original_regions(np.append(ids, -1))
    assert mapped[:-1].tolist() == [old_region[p] for p in new_region] and mapped[-1] == -1
    # The last prompt token and the room for the answer.
    assert int(new.meta.position[0, sharded.prompt.last_slot]) == prompt.next_position - 1
    room = np.asarray(new.meta.kind[0, sharded.free_slot : sharded.free_slot + NEW_TOKENS])
    assert (room == -1).all() and len(room) == NEW_TOKENS
    assert (np.asarray(new.meta.position[0, sharded.free_slot :]) < 0).all()

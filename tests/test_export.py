"""A training workdir exported as a Hugging Face LLaVA folder (plus gaze side files): transformers
loads it with no missing weight, gazejax reloads it bit for bit, and generate reads it as it
reads the workdir."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from PIL import Image

from gazejax import generate as generate_cli
from gazejax import inference
from gazejax.checkpointing import Checkpointer, TrainState
from gazejax.convert import ConversionError
from gazejax.convert.__main__ import main as convert_cli
from gazejax.data.vocab import build_tokenizer
from gazejax.gaze.inputs import MultimodalInputs
from gazejax.inference.checkpoints import (
    SIDE_CONFIG,
    SIDE_TENSORS,
    Checkpoint,
    export_checkpoint,
)
from gazejax.models.from_config import multimodal_config
from gazejax.models.mllm import MultimodalModel
from tests.workdirs import tiny_gaze_config

QUESTION = "what color is the square?"


def _png(path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 36, 3), np.uint8)).save(path)
    return str(path)


def _workdir(root):
    """A training workdir of a tiny gaze model with random parameters (no compilation: shapes
    from ``eval_shape``) whose ViT output LLaVA can express."""
    config = tiny_gaze_config()
    config.model.vit = {**config.model.vit, "output": "penultimate"}
    model_config = multimodal_config(config.model)
    geometry = model_config.geometry
    inputs = MultimodalInputs.abstract(geometry, 1, geometry.slots_per_unit, 1, 4)
    abstract = jax.eval_shape(MultimodalModel(model_config).init, jax.random.key(0), inputs)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: jnp.asarray(rng.normal(0, 0.5, x.shape), jnp.float32),
        nn.unbox(abstract)["params"],
    )
    workdir = root / "workdir"
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    checkpointer = Checkpointer(str(workdir), every_steps=1, max_to_keep=1)
    checkpointer.save(3, TrainState(jnp.int32(3), params, optax.adam(1e-3).init(params)),
                      config.to_dict(), {})  # fmt: skip
    checkpointer.close()
    return workdir, model_config


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(workdir, exported folder) of a tiny gaze model whose ViT output LLaVA can express."""
    root = tmp_path_factory.mktemp("export")
    workdir, _ = _workdir(root)
    out = root / "hf"
    assert convert_cli(["workdir-to-hf", "--input", str(workdir), "--output", str(out)]) == 0
    return workdir, out


def test_transformers_loads_every_weight_and_gazejax_reloads_bit_exact(exported):
    workdir, out = exported
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        out, output_loading_info=True
    )
    assert not any(info.values()), info
    assert model.config.image_token_index == build_tokenizer().token_to_id("<image>")
    assert model.config.vision_feature_layer == -2
    assert (out / SIDE_TENSORS).exists()
    assert json.loads((out / SIDE_CONFIG).read_text())["step"] == 3

    want = inference.load_checkpoint(workdir)
    got = inference.load_checkpoint(out)
    assert got.config == want.config and got.config.num_context_tokens == 2
    assert (got.step, got.system_prompt, got.max_frames) == (3, want.system_prompt, 2)
    assert got.run_config == want.run_config
    assert got.tokenizer.get_vocab() == want.tokenizer.get_vocab()
    assert jax.tree.structure(got.params) == jax.tree.structure(want.params)
    jax.tree.map(np.testing.assert_array_equal, got.params, want.params)


def test_generate_reads_the_exported_folder_as_the_workdir(exported, tmp_path, capsys):
    image = _png(tmp_path / "a.png", 1)
    printed = []
    for source in exported:  # one token: one compilation (the prefill), shared by both runs
        argv = ["--checkpoint", str(source), "--image", image, "--prompt", QUESTION]
        assert generate_cli.main([*argv, "--max-new-tokens", "1"]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"vit": {"output": "last"}}, "output='last'"),
        ({"projector": {"compress": True}}, "token compression"),
    ],
)
def test_a_model_llava_cannot_express_is_refused(tmp_path, change, message):
    config = tiny_gaze_config()
    for section, values in change.items():
        config.model[section] = {**config.model[section], **values}
    checkpoint = Checkpoint(multimodal_config(config.model), {}, build_tokenizer())
    with pytest.raises(ConversionError, match=message):
        export_checkpoint(checkpoint, tmp_path)

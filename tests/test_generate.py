"""python -m gazejax.generate: cached greedy decoding equals a no-cache re-run; maps; errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from gazejax import generate as generate_cli
from gazejax import inference
from gazejax.configuration import base_config
from gazejax.data.packing import Text
from gazejax.data.template import tokenize_conversation
from gazejax.data.vocab import build_tokenizer, vocabulary
from gazejax.inference import maps, probes
from gazejax.models.from_config import multimodal_config
from gazejax.models.mllm import MultimodalModel
from tests.workdirs import greedy_reference, save_random_workdir

QUESTION = "what color is the square?"
NUM_LAYERS, NUM_HEADS, TOP_K = 2, 4, 2


def _train_config():
    config = base_config(stage=2, attention="gaze")
    config.model.vit = {"variant": "mu/4", "image_size": 16}  # 4x4 tokens per unit
    config.model.decoder = dict(
        vocab_size=len(vocabulary()),
        hidden_size=32,
        intermediate_size=48,
        num_layers=NUM_LAYERS,
        num_heads=NUM_HEADS,
        num_kv_heads=2,
        head_dim=8,
    )
    config.model.gaze.top_k = TOP_K
    config.model.num_context_tokens = 2
    config.model.region_size = (2, 2, 1)  # 4 regions per unit
    config.data.synthetic = {"video_frames": 3}
    config.data.system_prompt = "You are a helpful assistant."
    return config


def _png(path, seed, size=24):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir of a random tiny model: config.json + checkpoints/ (as train writes)."""
    root = tmp_path_factory.mktemp("gen")
    config = _train_config()
    model_config = multimodal_config(config.model)
    image = _png(root / "init.png", 0)
    visuals = inference.load_visuals([image], image_size=model_config.vit.image_size)
    prompt = inference.build_prompt(model_config, build_tokenizer(), QUESTION, visuals)
    return save_random_workdir(root, config, prompt.inputs)


@pytest.mark.parametrize("attention", ["dense", "gaze"])
def test_cli_greedy_equals_no_cache_reference(workdir, tmp_path, capsys, attention):
    image = _png(tmp_path / "a.png", 1)
    argv = ["--checkpoint", str(workdir), "--image", image, "--prompt", QUESTION]
    argv += ["--max-new-tokens", "5", "--attention", attention]
    assert generate_cli.main(argv) == 0
    printed = capsys.readouterr().out.strip()

    checkpoint = inference.load_checkpoint(workdir)
    assert checkpoint.step == 3
    config = inference.with_attention(checkpoint.config, attention)
    visuals = inference.load_visuals([image], image_size=config.vit.image_size)
    prompt = inference.build_prompt(
        config, checkpoint.tokenizer, QUESTION, visuals, checkpoint.system_prompt
    )
    model = MultimodalModel(config)
    result = inference.generate_answer(
        model, checkpoint.params, prompt, 5, tokenizer=checkpoint.tokenizer
    )
    assert printed == result.text.strip()
    expected, selections = greedy_reference(
        model, checkpoint.params, prompt, len(result.token_ids), TOP_K
    )
    assert result.token_ids.tolist() == expected
    if attention == "dense":
        assert result.selections is None
    else:
        assert result.selections.shape == (len(expected), NUM_LAYERS, NUM_HEADS, TOP_K)
        for got, want in zip(result.selections, selections, strict=True):
            np.testing.assert_array_equal(np.sort(got, -1), np.sort(want, -1))


def test_video_folder_routing_and_attention_maps(workdir, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for t in (0, 1, 2, 10):  # natural order; max_frames (video_frames = 3) keeps 3
        _png(frames / f"f{t}.png", 10 + t, size=16)
    routing, attention = tmp_path / "routing.png", tmp_path / "attention.png"
    argv = ["--checkpoint", str(workdir), "--video", str(frames), "--prompt", QUESTION]
    argv += ["--max-new-tokens", "3", "--attention", "gaze"]
    argv += ["--routing-map", str(routing), "--attention-map", str(attention)]
    assert generate_cli.main(argv) == 0, capsys.readouterr().err

    checkpoint = inference.load_checkpoint(workdir)
    visuals = inference.load_visuals(
        videos=[str(frames)], image_size=16, max_frames=checkpoint.max_frames
    )
    assert visuals[0].shape == (3, 16, 16, 3)
    prompt = inference.build_prompt(
        checkpoint.config, checkpoint.tokenizer, QUESTION, visuals, checkpoint.system_prompt
    )
    result = inference.generate_answer(
        MultimodalModel(checkpoint.config), checkpoint.params, prompt, 3,
        tokenizer=checkpoint.tokenizer,
    )  # fmt: skip
    assert result.selections.shape[1:] == (NUM_LAYERS, NUM_HEADS, TOP_K)
    assert prompt.inputs.regions.num_regions == 12  # 3 frames x 4 regions
    with Image.open(routing) as png:
        assert png.size == maps.map_size(len(result.token_ids), 3)
    with Image.open(attention) as png:
        assert png.size == maps.map_size(2, 3)
    fractions = probes.region_fractions(result.selections[0], 12)
    assert fractions.shape == (12,) and 0 < fractions.max() <= 1
    # every (layer, head) pair selects TOP_K distinct regions
    np.testing.assert_allclose(fractions.sum(), TOP_K)
    cells = probes.region_cells(prompt, checkpoint.config)
    assert sorted(cells) == list(range(12))
    assert cells[5] == [(1, 0, 2, 2, 4)]  # frame 1, top-right 2x2 block


def test_prompt_is_the_training_template(workdir):
    checkpoint = inference.load_checkpoint(workdir)
    tokenizer = checkpoint.tokenizer
    visuals = [np.zeros((1, 16, 16, 3), np.float32)]
    prompt = inference.build_prompt(
        checkpoint.config, tokenizer, QUESTION, visuals, checkpoint.system_prompt
    )
    conversation = [
        {"from": "human", "value": f"<image>\n{QUESTION}"},
        {"from": "gpt", "value": "red"},
    ]
    ids, _ = tokenize_conversation(conversation, tokenizer, checkpoint.system_prompt)
    ids = ids[ids != tokenizer.token_to_id("<image>")]
    text = np.concatenate([x.ids for x in prompt.items if isinstance(x, Text)])
    answer = len(tokenizer.encode("red<|im_end|>\n", add_special_tokens=False).ids)
    np.testing.assert_array_equal(text, ids[:-answer])


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_bad_image_names_the_file(workdir, tmp_path, capsys, problem):
    path = tmp_path / "bad.png"
    if problem == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    argv = ["--checkpoint", str(workdir), "--image", str(path), "--prompt", QUESTION]
    assert generate_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "cannot read image" in err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    argv = ["--checkpoint", str(tmp_path), "--image", "x.png", "--prompt", QUESTION]
    assert generate_cli.main(argv) == 1
    assert "config.json" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dense_workdir(workdir, tmp_path_factory):
    """The same weights, trained dense as far as its config.json says."""
    root = tmp_path_factory.mktemp("dense")
    shutil.copytree(workdir, root, dirs_exist_ok=True)
    config = json.loads((root / "config.json").read_text())
    config["model"]["attention"] = "dense"
    (root / "config.json").write_text(json.dumps(config))
    return root


@pytest.mark.parametrize(
    "dense,options,message",
    [
        (False, ["--top-k", "0"], "--top-k must be >= 1, got 0"),
        (False, ["--top-k", "5"], "--top-k 5 is more than the 4 regions of the prompt's"),
        (False, ["--attention", "dense", "--top-k", "2"], "but --attention dense decodes with"),
        (True, ["--top-k", "2"], "but this checkpoint is dense (add --attention gaze)"),
    ],
)
def test_top_k_is_used_as_given_or_refused(
    workdir, dense_workdir, tmp_path, capsys, dense, options, message
):
    image = _png(tmp_path / "a.png", 1)
    checkpoint = dense_workdir if dense else workdir
    argv = ["--checkpoint", str(checkpoint), "--image", image, "--prompt", QUESTION, *options]
    assert generate_cli.main([*argv, "--max-new-tokens", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err

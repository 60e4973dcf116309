"""LLaVA-family MLLMs (SigLIP + projector + Qwen) from Hugging Face folders equal
``transformers``' ``LlavaForConditionalGeneration`` (float32), stored region-major."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from gazejax.convert import ConversionError, load_hf
from gazejax.convert.__main__ import main
from gazejax.convert.llava import multimodal_config_from_hf
from gazejax.data.packing import Text, Visual
from gazejax.inference.decode import generate_answer
from gazejax.inference.prompts import pack_prompt
from kernels.gaze_attention import TokenKind
from tests.hf_reference import save_llava
from tests.tolerances import assert_close_accumulated

IMAGE_TOKEN = 100
TOKENS_PER_IMAGE = 16  # 16-px images, 4-px patches
GREEDY_STEPS = 16

# (text model, kv heads of 4 query heads, tied head, vision_feature_layer, prompt layout: text
# span lengths and images "i"). Each case compiles a forward, a prefill and a decode step
# (~15 s here), so the third runs with -m slow only.
CASES = {
    "qwen3-gqa2-untied-layer-2-one-image": ("qwen3", 2, False, -2, (5, "i", 4)),
    "qwen2-gqa4-tied-layer-1-text-between": ("qwen2", 1, True, -1, (3, "i", 4, "i", 2)),
    "qwen3-gqa1-untied-layer1-image-first": ("qwen3", 4, False, 1, ("i", 2, "i", 5)),
}
SLOW = {"qwen3-gqa1-untied-layer1-image-first"}


def _prompt(layout, seed: int) -> tuple[list, np.ndarray, np.ndarray]:
    """Items for gazejax, and the same prompt as HF input ids and NCHW pixels."""
    rng = np.random.default_rng(seed)
    items, ids, pixels = [], [], []
    for part in layout:
        if part == "i":
            image = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
            items.append(Visual(image))
            ids += [IMAGE_TOKEN] * TOKENS_PER_IMAGE
            pixels.append(image[0].transpose(2, 0, 1))
        else:
            span = rng.integers(0, IMAGE_TOKEN, part).astype(np.int32)
            items.append(Text(span))
            ids += span.tolist()
    return items, np.asarray(ids), np.stack(pixels)


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW else []) for c in CASES]
)
def test_logits_and_greedy_tokens_match_transformers(tmp_path, case):
    text_type, kv_heads, tied, layer, layout = CASES[case]
    hf = save_llava(
        tmp_path,
        text_type,
        seed=kv_heads,
        vision_feature_layer=layer,
        image_token_index=IMAGE_TOKEN,
        tie_word_embeddings=tied,
        num_key_value_heads=kv_heads,
    )
    # 3×3 regions on the 4×4 grid: region-major storage differs from raster order.
    model, params = load_hf(tmp_path, region_size=(3, 3, 1))
    cfg = model.config
    assert (cfg.decoder.num_kv_heads, cfg.decoder.tie_embeddings) == (kv_heads, tied)
    assert cfg.num_context_tokens == 0 and cfg.decoder.attention == "dense"
    assert cfg.vit.output_blocks == (layer if layer >= 0 else cfg.vit.depth + 1 + layer)

    items, ids, pixels = _prompt(layout, seed=kv_heads)
    prompt = pack_prompt(cfg, items)
    visual = np.asarray(prompt.inputs.visual_index[0])
    stored = visual[visual >= 0]
    assert (np.diff(stored) < 0).any(), "storage should be region-major, not raster"

    hf_inputs = dict(input_ids=torch.tensor(ids[None]), pixel_values=torch.tensor(pixels))
    with torch.no_grad():
        reference = hf(**hf_inputs).logits[0].numpy()
        hf_tokens = hf.generate(
            **hf_inputs, max_new_tokens=GREEDY_STEPS, do_sample=False, pad_token_id=0
        )[0, len(ids) :].numpy()
    logits = np.asarray(jax.jit(model.apply)({"params": params}, prompt.inputs))[0]
    kind = np.asarray(prompt.inputs.meta.kind[0])
    position = np.asarray(prompt.inputs.meta.position[0])
    text = np.flatnonzero(kind == TokenKind.TEXT)
    assert len(text) == (ids != IMAGE_TOKEN).sum()
    got, want = logits[text], reference[position[text]]
    print(
        f"{case}: max |logit error| {np.abs(got - want).max():.2e}, max |logit| "
        f"{np.abs(want).max():.2f}"
    )
    assert_close_accumulated(got, want)

    result = generate_answer(model, params, prompt, GREEDY_STEPS)
    np.testing.assert_array_equal(result.token_ids, hf_tokens)


def _llava_config(**overrides) -> dict:
    config = json.loads(
        json.dumps(
            {
                "model_type": "llava",
                "image_token_index": 100,
                "vision_feature_layer": -2,
                "vision_feature_select_strategy": "full",
                "vision_config": {
                    "model_type": "siglip_vision_model",
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 3,
                    "num_attention_heads": 2,
                    "image_size": 16,
                    "patch_size": 4,
                },
                "text_config": {
                    "model_type": "qwen3",
                    "vocab_size": 101,
                    "hidden_size": 64,
                    "intermediate_size": 96,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "head_dim": 16,
                },
            }
        )
    )
    config.update(overrides)
    return config


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"vision_feature_select_strategy": "default"}, "CLS token"),
        ({"vision_feature_layer": [-2, -1]}, "only one layer"),
        ({"vision_feature_layer": -5}, "outside the tower's 4 hidden states"),
        ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
        ({"image_token_index": 101}, "below vocab_size 101"),
        ({"text_config": {"model_type": "llama"}}, "text_config.model_type 'llama'"),
    ],
)
def test_what_cannot_be_honoured_is_refused(overrides, message):
    assert multimodal_config_from_hf(_llava_config()).vit.output == 2
    with pytest.raises(ConversionError, match=message):
        multimodal_config_from_hf(_llava_config(**overrides))


def test_every_writers_key_spelling_loads_the_same(tmp_path):
    """transformers >= 4.52 in memory (``model.language_model.``, ``lm_head.``) and transformers
    4 (``vision_tower.vision_model.``) spell the keys differently from ``save_pretrained``."""
    save_llava(tmp_path / "saved", seed=3)
    _, want = load_hf(tmp_path / "saved")
    tensors = load_file(tmp_path / "saved" / "model.safetensors")
    spellings = {
        "language_model.model.": "model.language_model.",
        "language_model.lm_head.": "lm_head.",
        "vision_tower.": "model.vision_tower.vision_model.",
        "multi_modal_projector.": "model.multi_modal_projector.",
    }
    renamed = {}
    for key, value in tensors.items():
        old = next(p for p in spellings if key.startswith(p))
        renamed[spellings[old] + key[len(old) :]] = value
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    save_file(renamed, other / "model.safetensors")
    _, got = load_hf(other)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_cli_round_trip_is_bit_exact_and_transformers_loads_the_result(tmp_path):
    hf = save_llava(tmp_path / "hf", "qwen2", seed=5, tie_word_embeddings=True)
    for command, source, target in (("hf-to-gazejax", "hf", "gj"), ("gazejax-to-hf", "gj", "back")):
        args = [command, "--input", str(tmp_path / source), "--output", str(tmp_path / target)]
        assert main(args) == 0
    original = load_file(tmp_path / "hf" / "model.safetensors")
    exported = load_file(tmp_path / "back" / "model.safetensors")
    original.pop("language_model.lm_head.weight", None)  # tied: the embedding
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["image_token_index"] == IMAGE_TOKEN and config["vision_feature_layer"] == -2

    back, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "back", output_loading_info=True
    )
    assert not any(info.values()), info
    _, ids, pixels = _prompt((3, "i", 2), seed=0)
    inputs = dict(input_ids=torch.tensor(ids[None]), pixel_values=torch.tensor(pixels))
    with torch.no_grad():
        np.testing.assert_array_equal(back(**inputs).logits, hf(**inputs).logits)

"""Qwen3 / Qwen2 decoders loaded from Hugging Face folders equal ``transformers`` (float32)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from gazejax.convert import ConversionError, load_hf, save_hf
from gazejax.inference.decode import generate_token_ids
from tests.hf_reference import perturb_biases, save_qwen
from tests.tolerances import assert_close_accumulated

# (model_type, tied embeddings, num_kv_heads with 4 query heads -> GQA ratio 1, 2, 4)
CASES = [
    ("qwen3", False, 4),
    ("qwen3", True, 2),
    ("qwen3", False, 1),
    ("qwen3", True, 4),
    ("qwen2", False, 2),
    ("qwen2", True, 1),
]


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("model_type,tied,kv_heads", CASES)
def test_logits_match_transformers(tmp_path, model_type, tied, kv_heads):
    hf = save_qwen(
        tmp_path, model_type, seed=kv_heads, tie_word_embeddings=tied, num_key_value_heads=kv_heads
    )
    if model_type == "qwen2":  # HF initialises biases to zero; make them count
        perturb_biases(hf, seed=1)
        hf.save_pretrained(tmp_path)
    model, params = load_hf(tmp_path)
    assert model.config.num_kv_heads == kv_heads and model.config.tie_embeddings == tied
    assert model.config.qk_norm == (model_type == "qwen3")
    ids = np.random.default_rng(kv_heads).integers(0, 101, size=(3, 17))
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32)))
    reference = _hf_logits(hf, ids)
    err = np.abs(ours - reference).max()
    print(f"{model_type} tied={tied} kv_heads={kv_heads}: max |logit error| = {err:.2e}")
    assert_close_accumulated(ours, reference)


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2"])
def test_greedy_generation_matches_transformers(tmp_path, model_type):
    hf = save_qwen(tmp_path, model_type, seed=3)
    model, params = load_hf(tmp_path)
    prompt = np.random.default_rng(3).integers(0, 101, size=(2, 7))
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor(prompt),
            attention_mask=torch.ones_like(torch.tensor(prompt)),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            pad_token_id=0,
        )[:, prompt.shape[1] :].numpy()
    ours = np.asarray(generate_token_ids(model, params, jnp.asarray(prompt), 32))
    np.testing.assert_array_equal(ours, expected)


def test_bfloat16_compute_tolerance(tmp_path):
    """bfloat16 compute with float32 parameters: max logit error within 3% of the logit range."""
    hf = save_qwen(tmp_path, "qwen3", seed=5)
    model, params = load_hf(tmp_path)
    model_bf16 = model.clone(config=dataclasses.replace(model.config, dtype=jnp.bfloat16))
    ids = np.random.default_rng(5).integers(0, 101, size=(2, 16))
    ours = np.asarray(model_bf16.apply({"params": params}, jnp.asarray(ids, jnp.int32)))
    reference = _hf_logits(hf, ids)
    err = np.abs(ours - reference).max()
    scale = np.abs(reference).max()
    print(f"bf16 compute: max |logit error| = {err:.3e} (max |logit| = {scale:.2f})")
    assert ours.dtype == np.float32
    assert err <= 0.03 * scale


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    src, out = tmp_path / "src", tmp_path / "out"
    hf = save_qwen(src, "qwen3", seed=7)
    if dtype == "bfloat16":
        hf.to(torch.bfloat16).save_pretrained(src)
    model, params = load_hf(src)
    save_hf(model, params, out, dtype=dtype)
    original, written = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(original) == sorted(written)
    for key, value in original.items():
        assert written[key].dtype == value.dtype, key
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    ids = np.random.default_rng(7).integers(0, 101, size=(1, 9))
    logits = [
        _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32), ids)
        for f in (src, out)
    ]
    np.testing.assert_array_equal(*logits)


def test_sharded_checkpoint_folder(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    hf = save_qwen(src, "qwen2", seed=9)
    hf.save_pretrained(src, max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").exists()
    model, params = load_hf(src)
    ids = np.random.default_rng(9).integers(0, 101, size=(1, 5))
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32)))
    assert_close_accumulated(ours, _hf_logits(hf, ids))
    save_hf(model, params, out, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _, params_again = load_hf(out)
    jax.tree.map(np.testing.assert_array_equal, params_again, params)


def _rewrite_tensors(folder, edit) -> None:
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    save_qwen(tmp_path, "qwen3")
    _rewrite_tensors(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(tmp_path)


def test_misshapen_tensor_is_named(tmp_path):
    save_qwen(tmp_path, "qwen3")
    key = "model.layers.0.self_attn.k_norm.weight"
    _rewrite_tensors(tmp_path, lambda t: t.__setitem__(key, np.ones((15,), np.float32)))
    with pytest.raises(ConversionError, match=r"k_norm\.weight.*\(15,\)"):
        load_hf(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    save_qwen(tmp_path, "qwen3")
    _rewrite_tensors(
        tmp_path, lambda t: t.__setitem__("model.extra.weight", np.ones(3, np.float32))
    )
    with pytest.raises(ConversionError, match=r"model\.extra\.weight"):
        load_hf(tmp_path)


def test_unsupported_model_type_is_named(tmp_path):
    save_qwen(tmp_path, "qwen3")
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="'llama'"):
        load_hf(tmp_path)

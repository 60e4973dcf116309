"""SigLIP checkpoints: Hugging Face folders and big_vision ``.npz`` files against transformers.

Tiny random towers (width 32, 2 blocks, 2 heads, mlp 64, 16 px images, patch 4) with every
parameter perturbed, so a weight that is loaded wrongly (or not at all) shows in the output.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from gazejax.convert import ConversionError, load_hf, save_hf
from gazejax.convert.big_vision import load_big_vision_npz, save_big_vision_npz
from gazejax.convert.hf import read_hf_config
from gazejax.convert.siglip import vit_config_from_hf
from gazejax.models.vit import VisionTransformer
from tests.tolerances import assert_close_accumulated

VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=16,
    patch_size=4,
)
TEXT = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=64,
    max_position_embeddings=8,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=3,
)
BF16_TOL = 0.15  # bf16 compute; measured max error 0.03 (head) and 0.07 (no head), outputs up to ~4


def perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen))


def make_vision(folder, use_head: bool, seed: int = 0) -> transformers.SiglipVisionModel:
    torch.manual_seed(seed)
    model = transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(**VISION, vision_use_head=use_head)
    )
    perturb(model, seed)
    model.eval().save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """NHWC, in the processor's [-1, 1] range."""
    return np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


@pytest.fixture(scope="module", params=[True, False], ids=["head", "no_head"])
def vision(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip_vision")
    return folder, make_vision(folder, request.param)


@pytest.fixture(scope="module")
def two_tower(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip")
    torch.manual_seed(1)
    model = transformers.SiglipModel(
        transformers.SiglipConfig(vision_config=VISION, text_config=TEXT)
    )
    perturb(model, 1)
    model.eval().save_pretrained(folder)
    return folder, model


def hf_outputs(model, pixels: np.ndarray):
    with torch.no_grad():
        return model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)


def apply(model: VisionTransformer, params: dict, pixels: np.ndarray, **overrides):
    model = VisionTransformer(dataclasses.replace(model.config, **overrides))
    out, state = model.apply({"params": params}, pixels, mutable=["intermediates"])
    return np.asarray(out, np.float32), state["intermediates"]


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_vision_model_matches_hf(vision, pixels):
    folder, hf_model = vision
    model, params = load_hf(folder)
    want = hf_outputs(hf_model, pixels)
    out, inter = apply(model, params, pixels)
    assert_close_accumulated(out, want.last_hidden_state)
    if hf_model.config.vision_use_head:
        assert_close_accumulated(inter["pooled"][0], want.pooler_output)
    else:
        assert "pooled" not in inter
    penultimate, _ = apply(model, params, pixels, output="penultimate")
    assert_close_accumulated(penultimate, want.hidden_states[-2])


def test_two_tower_folder_matches_hf(two_tower, pixels):
    folder, hf_model = two_tower
    model, params = load_hf(folder)
    out, inter = apply(model, params, pixels)
    want = hf_outputs(hf_model.vision_model, pixels)
    assert_close_accumulated(out, want.last_hidden_state)
    assert_close_accumulated(inter["pooled"][0], want.pooler_output)


def test_scan_loads_stacked_keys_and_matches(vision, pixels):
    folder, hf_model = vision
    model, params = load_hf(folder, scan=True)
    assert params["layers"]["attn"]["query"]["kernel"].shape == (2, 32, 2, 16)
    want = hf_outputs(hf_model, pixels)
    assert_close_accumulated(apply(model, params, pixels)[0], want.last_hidden_state)
    assert_close_accumulated(
        apply(model, params, pixels, output="penultimate")[0], want.hidden_states[-2]
    )


def test_bfloat16_compute_close_to_hf(vision, pixels):
    folder, hf_model = vision
    model, params = load_hf(folder)
    out, _ = apply(model, params, pixels, dtype="bfloat16")
    assert max_err(out, hf_outputs(hf_model, pixels).last_hidden_state) <= BF16_TOL


@pytest.mark.parametrize("scan", [False, True])
def test_round_trip_is_bit_exact_and_loads_in_transformers(vision, pixels, tmp_path, scan):
    folder, hf_model = vision
    model, params = load_hf(folder, scan=scan)  # scan: export through stacked-keys rules
    save_hf(model, params, tmp_path)
    original = load_file(os.path.join(folder, "model.safetensors"))
    resaved = load_file(os.path.join(tmp_path, "model.safetensors"))
    assert sorted(resaved) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(resaved[key], value, err_msg=key)
    reloaded, info = transformers.SiglipVisionModel.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not any(info.values()), info
    np.testing.assert_array_equal(
        hf_outputs(reloaded.eval(), pixels).last_hidden_state,
        hf_outputs(hf_model, pixels).last_hidden_state,
    )


def test_two_tower_saves_as_vision_model(two_tower, tmp_path):
    folder, _ = two_tower
    save_hf(*load_hf(folder), tmp_path)
    original = load_file(os.path.join(folder, "model.safetensors"))
    resaved = load_file(os.path.join(tmp_path, "model.safetensors"))
    vision = {
        k.removeprefix("vision_model."): v
        for k, v in original.items()
        if k.startswith("vision_model.")
    }
    assert sorted(resaved) == sorted(vision)
    for key, value in vision.items():
        np.testing.assert_array_equal(resaved[key], value, err_msg=key)


def test_sharded_folder_loads(vision, tmp_path):
    folder, _ = vision
    model, params = load_hf(folder)
    save_hf(model, params, tmp_path, max_shard_bytes=8192)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    assert os.path.exists(os.path.join(tmp_path, "model.safetensors.index.json"))
    _, reloaded = load_hf(tmp_path)
    for a, b in zip(jax.tree.leaves(reloaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_transformers4_vision_folder_with_prefix(vision, pixels, tmp_path):
    """transformers 4 wrote ``SiglipVisionModel`` keys under ``vision_model.``."""
    folder, hf_model = vision
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    save_file(
        {f"vision_model.{k}": v for k, v in tensors.items()},
        os.path.join(tmp_path, "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = {**read_hf_config(folder), "transformers_version": "4.57.1"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, params = load_hf(tmp_path)
    out, _ = apply(model, params, pixels)
    assert_close_accumulated(out, hf_outputs(hf_model, pixels).last_hidden_state)


def rewrite(folder, tmp_path, edit) -> str:
    """A copy of ``folder`` whose tensors went through ``edit(dict)``."""
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    return tmp_path


def test_missing_tensor_is_named(vision, tmp_path):
    folder, _ = vision
    bad = rewrite(folder, tmp_path, lambda t: t.pop("encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(ConversionError, match=r"encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_hf(bad)


def test_misshapen_tensor_is_named(vision, tmp_path):
    folder, _ = vision

    def edit(t):
        t["embeddings.position_embedding.weight"] = t["embeddings.position_embedding.weight"][:9]

    with pytest.raises(ConversionError, match=r"embeddings\.position_embedding\.weight"):
        load_hf(rewrite(folder, tmp_path, edit))


def test_unsupported_configs(vision, tmp_path):
    folder, _ = vision
    config = read_hf_config(folder)
    for model_type in ("siglip2", "clip_vision_model"):
        (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
        with pytest.raises(ConversionError, match=model_type):
            load_hf(tmp_path)
    with pytest.raises(ConversionError, match="hidden_act 'gelu'"):
        vit_config_from_hf({**config, "hidden_act": "gelu"})


def test_partial_two_tower_config_uses_hf_defaults():
    """Hub config.json files list only non-default vision fields."""
    config = vit_config_from_hf(
        {
            "model_type": "siglip",
            "vision_config": {
                "hidden_size": 1152,
                "intermediate_size": 4304,
                "num_attention_heads": 16,
                "num_hidden_layers": 27,
                "patch_size": 14,
                "image_size": 384,
            },
        }
    )
    assert (config.width, config.depth, config.patch_size, config.grid) == (1152, 27, 14, 27)
    assert (config.pool, config.layer_norm_eps) == ("map", 1e-6)


# ---- big_vision .npz -----------------------------------------------------------------------


def big_vision_tree(hf_model: transformers.SiglipVisionModel) -> dict[str, np.ndarray]:
    """The big_vision image tower of ``hf_model``: transformers' ``convert_siglip_to_hf`` key
    table, inverted (Linear weights transposed and split into heads, conv OIHW -> HWIO)."""
    t = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    d, heads = hf_model.config.hidden_size, hf_model.config.num_attention_heads
    split = lambda w: w.T.reshape(d, heads, d // heads)  # noqa: E731

    def attention(ours, theirs_q, theirs_k, theirs_v, theirs_out, biases):
        for name, w, b in zip(
            ("query", "key", "value"), (theirs_q, theirs_k, theirs_v), biases, strict=True
        ):
            tree[f"{ours}/{name}/kernel"] = split(w)
            tree[f"{ours}/{name}/bias"] = b.reshape(heads, d // heads)
        tree[f"{ours}/out/kernel"] = t[f"{theirs_out}.weight"].T.reshape(heads, d // heads, d)
        tree[f"{ours}/out/bias"] = t[f"{theirs_out}.bias"]

    def dense(ours, theirs):
        tree[f"{ours}/kernel"], tree[f"{ours}/bias"] = t[f"{theirs}.weight"].T, t[f"{theirs}.bias"]

    def norm(ours, theirs):
        tree[f"{ours}/scale"], tree[f"{ours}/bias"] = t[f"{theirs}.weight"], t[f"{theirs}.bias"]

    tree = {
        "embedding/kernel": t["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": t["embeddings.patch_embedding.bias"],
        "pos_embedding": t["embeddings.position_embedding.weight"][None],
    }
    norm("Transformer/encoder_norm", "post_layernorm")
    for i in range(hf_model.config.num_hidden_layers):
        ours, theirs = f"Transformer/encoderblock_{i}", f"encoder.layers.{i}"
        norm(f"{ours}/LayerNorm_0", f"{theirs}.layer_norm1")
        norm(f"{ours}/LayerNorm_1", f"{theirs}.layer_norm2")
        attention(
            f"{ours}/MultiHeadDotProductAttention_0",
            *(t[f"{theirs}.self_attn.{p}_proj.weight"] for p in "qkv"),
            f"{theirs}.self_attn.out_proj",
            [t[f"{theirs}.self_attn.{p}_proj.bias"] for p in "qkv"],
        )
        dense(f"{ours}/MlpBlock_0/Dense_0", f"{theirs}.mlp.fc1")
        dense(f"{ours}/MlpBlock_0/Dense_1", f"{theirs}.mlp.fc2")
    if hf_model.config.vision_use_head:
        tree["MAPHead_0/probe"] = t["head.probe"]
        attention(
            "MAPHead_0/MultiHeadDotProductAttention_0",
            *np.split(t["head.attention.in_proj_weight"], 3),
            "head.attention.out_proj",
            np.split(t["head.attention.in_proj_bias"], 3),
        )
        norm("MAPHead_0/LayerNorm_0", "head.layernorm")
        dense("MAPHead_0/MlpBlock_0/Dense_0", "head.mlp.fc1")
        dense("MAPHead_0/MlpBlock_0/Dense_1", "head.mlp.fc2")
    return tree


def scanned(tree: dict[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """big_vision's scanned layout: ``Transformer/encoderblock/...`` with a leading layer axis."""
    block0 = "Transformer/encoderblock_0/"
    out = {k: v for k, v in tree.items() if not k.startswith("Transformer/encoderblock_")}
    for key in (k for k in tree if k.startswith(block0)):
        leaf = key[len(block0) :]
        out[f"Transformer/encoderblock/{leaf}"] = np.stack(
            [tree[f"Transformer/encoderblock_{i}/{leaf}"] for i in range(depth)]
        )
    return out


@pytest.mark.parametrize("npz_scanned", [False, True], ids=["npz_loop", "npz_scan"])
@pytest.mark.parametrize("model_scan", [False, True], ids=["model_loop", "model_scan"])
def test_big_vision_two_tower_npz_matches_hf(vision, pixels, tmp_path, npz_scanned, model_scan):
    folder, hf_model = vision
    tree = big_vision_tree(hf_model)
    tree = scanned(tree, 2) if npz_scanned else tree
    rng = np.random.default_rng(4)
    two_tower = {f"params/img/{k}": v for k, v in tree.items()}
    two_tower.update(
        {
            "params/txt/Embed_0/embedding": rng.standard_normal((64, 32)),
            "params/t": np.ones(1),
            "params/b": np.zeros(1),
        }
    )
    np.savez(tmp_path / "siglip.npz", **two_tower)
    config = dataclasses.replace(vit_config_from_hf(read_hf_config(folder)), scan=model_scan)
    params = load_big_vision_npz(tmp_path / "siglip.npz", config)
    out, inter = apply(VisionTransformer(config), params, pixels)
    want = hf_outputs(hf_model, pixels)
    assert_close_accumulated(out, want.last_hidden_state)
    if config.pool == "map":
        assert_close_accumulated(inter["pooled"][0], want.pooler_output)


@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_npz_round_trip_is_bit_exact(vision, tmp_path, scan):
    folder, hf_model = vision
    tree = big_vision_tree(hf_model)
    tree = scanned(tree, 2) if scan else tree
    np.savez(tmp_path / "in.npz", **tree)
    config = dataclasses.replace(vit_config_from_hf(read_hf_config(folder)), scan=scan)
    save_big_vision_npz(
        load_big_vision_npz(tmp_path / "in.npz", config), config, tmp_path / "out.npz"
    )
    with np.load(tmp_path / "out.npz") as out:
        assert sorted(out) == sorted(tree)
        for key, value in tree.items():
            np.testing.assert_array_equal(out[key], value, err_msg=key)


def test_big_vision_missing_and_misshapen_keys_are_named(vision, tmp_path):
    folder, hf_model = vision
    config = vit_config_from_hf(read_hf_config(folder))
    tree = big_vision_tree(hf_model)
    missing = {k: v for k, v in tree.items() if k != "Transformer/encoderblock_1/LayerNorm_0/bias"}
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(ConversionError, match="Transformer/encoderblock_1/LayerNorm_0/bias"):
        load_big_vision_npz(tmp_path / "missing.npz", config)
    np.savez(tmp_path / "misshapen.npz", **{**tree, "embedding/kernel": np.ones((4, 4, 1, 32))})
    with pytest.raises(ConversionError, match="embedding/kernel"):
        load_big_vision_npz(tmp_path / "misshapen.npz", config)

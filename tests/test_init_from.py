"""``config.init_from``: converted checkpoints initialise the ViT and the decoder."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from gazejax.convert import ConversionError, load_hf
from gazejax.convert.native import save_gazejax
from gazejax.init_from import init_from_checkpoints
from gazejax.models.mllm import MultimodalModel
from tests.hf_reference import save_qwen
from tests.test_mllm import _config, _inputs


def _model_params(config):
    inputs = _inputs(config)
    return nn.unbox(MultimodalModel(config).init(jax.random.key(0), inputs))["params"]


def _siglip(folder, config):
    vit = config.vit
    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(
            hidden_size=vit.width,
            num_hidden_layers=vit.depth,
            num_attention_heads=vit.num_heads,
            intermediate_size=vit.mlp_dim,
            image_size=vit.image_size,
            patch_size=vit.patch_size,
            vision_use_head=False,
        )
    )
    hf.save_pretrained(folder)


def test_vision_from_hf_and_decoder_from_gazejax_folder(tmp_path):
    config = _config()
    dec = config.decoder
    save_qwen(
        tmp_path / "qwen",
        vocab_size=dec.vocab_size,
        hidden_size=dec.hidden_size,
        intermediate_size=dec.intermediate_size,
        num_hidden_layers=dec.num_layers,
        num_attention_heads=dec.num_heads,
        num_key_value_heads=dec.num_kv_heads,
        head_dim=dec.head_dim,
        tie_word_embeddings=dec.tie_embeddings,
    )
    save_gazejax(*load_hf(tmp_path / "qwen"), tmp_path / "qwen_gazejax")
    _siglip(tmp_path / "siglip", config)
    params = _model_params(config)
    loaded = init_from_checkpoints(
        params,
        {"vision": str(tmp_path / "siglip"), "decoder": str(tmp_path / "qwen_gazejax")},
        config,
    )
    _, vision = load_hf(tmp_path / "siglip")
    _, decoder = load_hf(tmp_path / "qwen")
    jax.tree.map(np.testing.assert_array_equal, loaded["vision"], vision)
    jax.tree.map(np.testing.assert_array_equal, loaded["decoder"], decoder)
    jax.tree.map(np.testing.assert_array_equal, loaded["projector"], params["projector"])


def test_a_checkpoint_of_another_size_is_refused(tmp_path):
    config = _config()
    save_qwen(tmp_path / "qwen", vocab_size=config.decoder.vocab_size, hidden_size=64)
    with pytest.raises(ConversionError, match=r"init_from.decoder=.*embed_tokens/embedding"):
        init_from_checkpoints(_model_params(config), {"decoder": str(tmp_path / "qwen")}, config)

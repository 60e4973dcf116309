"""``config.init_from``: converted checkpoints initialise the ViT and the decoder, or a whole
LLaVA MLLM the ViT, projector and decoder."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
import torch
import transformers

from gazejax.convert import ConversionError, load_hf
from gazejax.convert.native import save_gazejax
from gazejax.gaze.inputs import MultimodalInputs
from gazejax.init_from import init_from_checkpoints
from gazejax.models.decoder import DecoderConfig
from gazejax.models.mllm import MultimodalConfig, MultimodalModel
from gazejax.models.projector import ProjectorConfig
from gazejax.models.vit import vit_config
from tests.hf_reference import save_llava, save_qwen
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


def _llava_training_config(**changes) -> MultimodalConfig:
    """A gaze model (2 context tokens) of ``save_llava``'s architecture."""
    vit = vit_config(
        "mu/4", width=32, depth=3, mlp_dim=64, num_heads=2, patch_size=4, image_size=16
    )
    decoder = DecoderConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10000.0, attention="gaze",
    )  # fmt: skip
    config = MultimodalConfig(
        vit=dataclasses.replace(vit, output="penultimate"),
        projector=ProjectorConfig(vision_width=32, hidden_size=64),
        decoder=decoder,
        num_context_tokens=2,
        region_size=(2, 2, 1),
    )
    return dataclasses.replace(config, **changes)


def test_a_whole_llava_mllm_initialises_all_but_the_context_tokens(tmp_path):
    save_llava(tmp_path, seed=4)
    config = _llava_training_config()
    geometry = config.geometry
    inputs = MultimodalInputs.abstract(geometry, 1, geometry.slots_per_unit, 1, 4)
    abstract = jax.eval_shape(MultimodalModel(config).init, jax.random.key(0), inputs)
    params = jax.tree.map(lambda x: np.full(x.shape, 7.0, np.float32), nn.unbox(abstract))
    loaded = init_from_checkpoints(params["params"], {"mllm": str(tmp_path)}, config)
    _, want = load_hf(tmp_path)
    for part in ("vision", "projector", "decoder"):  # (the folder's unused pooling head aside)
        want_part = {name: want[part][name] for name in loaded[part]}
        jax.tree.map(np.testing.assert_array_equal, loaded[part], want_part)
    np.testing.assert_array_equal(loaded["context_tokens"], params["params"]["context_tokens"])

    other = _llava_training_config(vit=dataclasses.replace(config.vit, output=3))
    with pytest.raises(ConversionError, match="init_from.mllm=.*another model"):
        init_from_checkpoints(params["params"], {"mllm": str(tmp_path)}, other)


def test_a_vocabulary_grown_by_the_tokenizer_starts_new_rows_at_the_mean(tmp_path):
    """A stock tokenizer gains <image> and <video> (ids 101, 102): a model of vocab 103 takes
    the 101 rows of the checkpoint and two rows (head columns) equal to their mean."""
    save_llava(tmp_path, seed=6)
    config = _llava_training_config()
    config = dataclasses.replace(
        config, decoder=dataclasses.replace(config.decoder, vocab_size=103)
    )
    geometry = config.geometry
    inputs = MultimodalInputs.abstract(geometry, 1, geometry.slots_per_unit, 1, 4)
    abstract = jax.eval_shape(MultimodalModel(config).init, jax.random.key(0), inputs)
    params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), nn.unbox(abstract)["params"])
    loaded = init_from_checkpoints(params, {"mllm": str(tmp_path)}, config)["decoder"]
    _, want = load_hf(tmp_path)
    for table, axis in ((("embed_tokens", "embedding"), 0), (("lm_head", "kernel"), 1)):
        got, old = loaded[table[0]][table[1]], want["decoder"][table[0]][table[1]]
        assert got.shape[axis] == 103
        np.testing.assert_array_equal(np.take(got, range(101), axis), old)
        mean = old.mean(axis, keepdims=True)
        np.testing.assert_array_equal(np.take(got, [101, 102], axis), np.repeat(mean, 2, axis))


def test_a_workdirs_parameters_restore_into_the_target_shardings(tmp_path):
    """init_from.workdir reads the latest step's parameters only (no optimizer state), straight
    into the requested shardings."""
    from gazejax.checkpointing import Checkpointer, TrainState
    from gazejax.init_from import load_workdir_params

    params = {"projector": {"kernel": np.arange(6.0).reshape(2, 3)}, "context_tokens": np.ones(4)}
    for step in (1, 2):
        stepped = jax.tree.map(lambda x, s=step: x * s, params)
        state = TrainState(np.int32(step), stepped, optax.adam(1e-3).init(stepped))
        checkpointer = Checkpointer(str(tmp_path), every_steps=1, max_to_keep=2)
        checkpointer.save(step, state, {}, {})
        checkpointer.close()
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            params)  # fmt: skip
    restored = load_workdir_params(str(tmp_path), abstract)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        assert got.sharding == sharding
        np.testing.assert_array_equal(got, 2 * want)
    with pytest.raises(ConversionError, match="init_from.workdir=.*no checkpoint"):
        load_workdir_params(str(tmp_path / "empty"), abstract)

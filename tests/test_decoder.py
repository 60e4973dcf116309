"""The Qwen decoder on its own: attention against JAX's, the KV cache, remat, sampling."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gazejax.inference.decode import generate_token_ids
from gazejax.inference.sampling import sample_next_token
from gazejax.models.attention import dense_attention
from gazejax.models.decoder import Decoder, DecoderConfig, KVCache
from gazejax.sharding import DEFAULT_LOGICAL_AXIS_RULES, make_mesh
from tests.tolerances import assert_close_accumulated

TINY = DecoderConfig(
    vocab_size=53,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=10000.0,
)


def _init(config: DecoderConfig, seed: int = 0):
    model = Decoder(config)
    params = model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    # Random norm scales, so that every parameter matters.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x + 0.3 * jax.random.normal(jax.random.key(len(str(path))), x.shape)
            if "norm" in str(path)
            else x
        ),
        nn.unbox(params),
    )
    return model, params


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_dense_attention_matches_jax(num_kv_heads):
    rng = np.random.default_rng(num_kv_heads)
    q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 7, num_kv_heads, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 7, num_kv_heads, 8)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 5, 7)) < 0.6)
    mask = mask.at[:, :, 0].set(True)  # JAX's op gives NaN-free output only for non-empty rows
    ours = dense_attention(q, k, v, mask)
    theirs = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 3, 2, 4)), jnp.float32) for _ in range(3))
    mask = jnp.array([[[True, False, False], [False, False, False], [True, True, True]]])
    out = dense_attention(q, k, v, mask)
    np.testing.assert_array_equal(out[:, 1], 0.0)
    grads = jax.grad(lambda *a: dense_attention(*a, mask).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(np.isfinite(g).all() for g in grads)


def test_prefill_and_decode_equal_full_forward():
    model, params = _init(TINY)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 12)), jnp.int32)
    full = model.apply({"params": params}, ids)
    cache = KVCache.empty(TINY, batch=2, max_len=16)
    logits, cache = model.apply({"params": params}, ids[:, :8], cache=cache)
    steps = [logits]
    for t in range(8, 12):
        logits, cache = model.apply({"params": params}, ids[:, t : t + 1], cache=cache)
        steps.append(logits)
    assert_close_accumulated(jnp.concatenate(steps, axis=1), full)
    assert (
        int(cache.end) == 12
        and bool(cache.meta.valid[:, :12].all())
        and not cache.meta.valid[:, 12:].any()
    )


def test_left_padded_batch_generates_like_each_sample_alone():
    model, params = _init(TINY, seed=2)
    rng = np.random.default_rng(2)
    short = rng.integers(0, TINY.vocab_size, 4)
    long = rng.integers(0, TINY.vocab_size, 7)
    batch = jnp.asarray(np.stack([np.concatenate([np.zeros(3, int), short]), long]), jnp.int32)
    mask = jnp.asarray(np.stack([np.arange(7) >= 3, np.ones(7, bool)]))
    together = generate_token_ids(model, params, batch, 6, prompt_mask=mask)
    alone = [
        generate_token_ids(model, params, jnp.asarray(p[None], jnp.int32), 6)[0]
        for p in (short, long)
    ]
    np.testing.assert_array_equal(together, np.stack(alone))


def test_eos_stops_and_pads():
    model, params = _init(TINY, seed=3)
    prompt = jnp.asarray(np.random.default_rng(3).integers(0, TINY.vocab_size, (1, 5)), jnp.int32)
    free = np.asarray(generate_token_ids(model, params, prompt, 8))[0]
    eos = int(free[2])
    stopped = np.asarray(generate_token_ids(model, params, prompt, 8, eos_id=eos))[0]
    first = int(np.argmax(free == eos))
    np.testing.assert_array_equal(stopped[: first + 1], free[: first + 1])
    assert (stopped[first:] == eos).all()


def test_remat_changes_nothing():
    model, params = _init(TINY, seed=4)
    remat_model = Decoder(dataclasses.replace(TINY, remat=True))
    ids = jnp.asarray(np.random.default_rng(4).integers(0, TINY.vocab_size, (2, 6)), jnp.int32)

    def loss(m, p):
        return jax.nn.log_softmax(m.apply({"params": p}, ids)).mean()

    np.testing.assert_allclose(loss(remat_model, params), loss(model, params), rtol=1e-6)
    g_plain, g_remat = (
        jax.grad(lambda p: loss(model, p))(params),
        jax.grad(lambda p: loss(remat_model, p))(params),
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), g_plain, g_remat)


def test_every_parameter_has_logical_axes_and_shards():
    model = Decoder(TINY)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    leaves = jax.tree.leaves(abstract["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim
    mesh = make_mesh((1, 1, 1, 1))
    specs = nn.get_partition_spec(abstract["params"])
    shardings = nn.logical_to_mesh_sharding(specs, mesh, DEFAULT_LOGICAL_AXIS_RULES)
    params = jax.jit(
        lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]),
        out_shardings=shardings,
    )()
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES):
        out = jax.jit(model.apply)({"params": params}, jnp.ones((2, 4), jnp.int32))
    assert out.shape == (2, 4, TINY.vocab_size)


def test_greedy_sampling_and_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    assert int(sample_next_token(logits, None)[0]) == 0
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.vmap(lambda k, p: sample_next_token(logits, k, 1.0, p)[0], in_axes=(0, None))
    full = np.bincount(np.asarray(draw(keys, 1.0)), minlength=4) / 4000
    np.testing.assert_allclose(full, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    nucleus = np.bincount(np.asarray(draw(keys, 0.7)), minlength=4) / 4000  # keeps {0, 1}
    assert nucleus[2:].sum() == 0
    np.testing.assert_allclose(nucleus[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)
    assert set(np.asarray(draw(keys[:50], 0.01)).tolist()) == {0}


def test_logit_slots_keep_only_those_logits():
    model, params = _init(TINY)
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 10)), jnp.int32)
    full = model.apply({"params": params}, ids)
    slots = jnp.asarray([[9, 2], [0, 7]], jnp.int32)
    some = model.apply({"params": params}, ids, logit_slots=slots)
    np.testing.assert_allclose(some, jnp.take_along_axis(full, slots[..., None], axis=1), atol=1e-6)
    cache = KVCache.empty(TINY, batch=2, max_len=12)
    last, cache = model.apply({"params": params}, ids, cache=cache, logit_slots=slots[:, :1])
    np.testing.assert_allclose(last[:, 0], full[jnp.arange(2), slots[:, 0]], atol=1e-6)
    assert int(cache.end) == 10  # the whole chunk is cached all the same

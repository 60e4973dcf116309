"""The multimodal model: gaze with every region selected is dense; the cache is exact."""

from __future__ import annotations

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gazejax.data.packing import Text, Visual, pack_batch
from gazejax.gaze.inputs import MultimodalInputs
from gazejax.gaze.regions import TextSegment, VisualSegment, batch_layouts, build_layout
from gazejax.models.decoder import Decoder, DecoderConfig, KVCache
from gazejax.models.mllm import MultimodalConfig, MultimodalModel
from gazejax.models.projector import ProjectorConfig
from gazejax.models.vit import vit_config
from kernels.gaze_attention import TokenKind
from tests.tolerances import assert_close_accumulated

VOCAB = 61


def _config(
    attention="dense",
    region_size=(2, 2, 1),
    implementation="reference",
    top_k=64,
    routing="per_head",
    context=2,
):
    vit = vit_config("mu/4", image_size=16)  # 4x4 token grid per unit
    return MultimodalConfig(
        vit=vit,
        projector=ProjectorConfig(vision_width=vit.width, hidden_size=32),
        decoder=DecoderConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            attention=attention,
            gaze_top_k=top_k,
            gaze_routing=routing,
            gaze_implementation=implementation,
        ),
        num_context_tokens=context,
        region_size=region_size,
    )


def _samples(seed: int):
    rng = np.random.default_rng(seed)

    def text(n):
        return Text(rng.integers(1, VOCAB, n))

    def visual(frames):
        return Visual(rng.uniform(-1, 1, (frames, 16, 16, 3)).astype(np.float32))

    return [
        [text(3), visual(1), text(4), visual(1), text(5)],  # text before, between and after
        [visual(3), text(6)],  # a video: three frames
        [text(2), visual(1), text(7)],  # fewer units than the others: padding
    ]


def _inputs(config, seed=0):
    return pack_batch(_samples(seed), config.geometry, length=96, max_units=3, num_regions=12)[0]


def _params(config, inputs, seed=0):
    model = MultimodalModel(config)
    params = nn.unbox(model.init(jax.random.key(seed), inputs))["params"]
    return model, params


@pytest.mark.parametrize("region_size", [(2, 2, 1), (3, 3, 1), (2, 2, 2), (4, 3, 2)])
@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_gaze_with_every_region_equals_dense(region_size, implementation):
    dense_cfg = _config("dense", region_size)
    gaze_cfg = _config("gaze", region_size, implementation, top_k=64)
    inputs = _inputs(dense_cfg, seed=1)
    model, params = _params(dense_cfg, inputs)
    dense = model.apply({"params": params}, inputs)
    gaze = MultimodalModel(gaze_cfg).apply({"params": params}, inputs)
    valid = np.asarray(inputs.meta.valid)
    assert_close_accumulated(np.asarray(gaze)[valid], np.asarray(dense)[valid])


def test_small_k_changes_only_what_follows_routed_text():
    inputs = _inputs(_config(), seed=2)
    model, params = _params(_config(), inputs)
    dense = np.asarray(model.apply({"params": params}, inputs))
    gaze = np.asarray(MultimodalModel(_config("gaze", top_k=1)).apply({"params": params}, inputs))
    kind, position = np.asarray(inputs.meta.kind), np.asarray(inputs.meta.position)
    for b in range(kind.shape[0]):
        first_visual = position[b][kind[b] == TokenKind.VISUAL].min()
        routed_text = (kind[b] == TokenKind.TEXT) & (position[b] > first_visual)
        first_routed = position[b][routed_text].min()
        before = (kind[b] != TokenKind.PADDING) & (position[b] < first_routed)
        assert_close_accumulated(gaze[b][before], dense[b][before])
        assert np.abs(gaze[b][routed_text] - dense[b][routed_text]).max() > 1e-4


def test_context_token_output_ignores_other_units():
    config = _config("gaze", top_k=1)
    inputs = _inputs(config, seed=3)
    model, params = _params(config, inputs)

    def hidden(inputs):
        _, state = model.apply({"params": params}, inputs, capture_intermediates=True)
        return np.asarray(state["intermediates"]["decoder"]["layers_1"]["__call__"][0][0])

    before = hidden(inputs)
    changed = inputs.replace(units=inputs.units.at[0, 1].add(0.5))  # sample 0, second image
    after = hidden(changed)
    unit = np.asarray(inputs.meta.unit)[0]
    kind = np.asarray(inputs.meta.kind)[0]
    own_context = (kind == TokenKind.CONTEXT) & (unit == 0)
    np.testing.assert_allclose(after[0][own_context], before[0][own_context], atol=1e-6)
    assert (
        np.abs(
            after[0][(kind == TokenKind.CONTEXT) & (unit == 1)]
            - before[0][(kind == TokenKind.CONTEXT) & (unit == 1)]
        ).max()
        > 1e-4
    )


def _slice(inputs: MultimodalInputs, end: int) -> MultimodalInputs:
    cut = lambda x: x[:, :end]  # noqa: E731
    return inputs.replace(
        input_ids=cut(inputs.input_ids),
        visual_index=cut(inputs.visual_index),
        context_index=cut(inputs.context_index),
        meta=jax.tree.map(cut, inputs.meta),
    )


@pytest.mark.parametrize(
    "attention,implementation,top_k,bounded",
    [
        ("dense", "reference", 1, False),
        ("gaze", "reference", 2, False),
        ("gaze", "xla", 2, False),
        ("gaze", "xla", 2, True),  # the step reads only text, context and selected regions
        ("gaze", "xla", 64, True),
    ],
)
def test_prefill_then_decode_equals_full_forward(attention, implementation, top_k, bounded):
    config = _config(attention, implementation=implementation, top_k=top_k)
    rng = np.random.default_rng(4)
    frames = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    sample = [
        Text(rng.integers(1, VOCAB, 3)),
        Visual(frames[:1]),
        Text(rng.integers(1, VOCAB, 2)),
        Visual(frames[1:]),
        Text(rng.integers(1, VOCAB, 6)),
    ]
    inputs, _ = pack_batch([sample], config.geometry, length=50, max_units=2, num_regions=8)
    model, params = _params(config, inputs)
    full = np.asarray(model.apply({"params": params}, inputs))
    total = int(np.asarray(inputs.meta.valid).sum())
    prefix = total - 4
    cache = KVCache.empty(config.decoder, batch=1, max_len=total, regions=inputs.regions)
    logits, cache = model.apply({"params": params}, _slice(inputs, prefix), cache=cache)
    assert_close_accumulated(np.asarray(logits)[0], full[0, :prefix])
    kind = np.asarray(inputs.meta.kind)
    unrouted = int(((kind == TokenKind.TEXT) | (kind == TokenKind.CONTEXT)).sum())
    for slot in range(prefix, total):
        meta = jax.tree.map(lambda x, s=slot: x[:, s : s + 1], inputs.meta)
        assert int(meta.kind[0, 0]) == TokenKind.TEXT
        step, cache = model.apply(
            {"params": params},
            inputs.input_ids[:, slot : slot + 1],
            meta,
            cache,
            max_unrouted_tokens=unrouted if bounded else None,
            method=MultimodalModel.extend,
        )
        assert_close_accumulated(np.asarray(step)[0, 0], full[0, slot])


def test_invalid_settings_name_the_key():
    with pytest.raises(ValueError, match="num_context_tokens"):
        _config(context=-1)
    with pytest.raises(ValueError, match="region_size"):
        _config(region_size=(0, 2, 1))
    with pytest.raises(ValueError, match="region_size"):
        _config(region_size=(5, 2, 1))  # larger than the 4x4 grid
    with pytest.raises(ValueError, match="top_k"):
        _config("gaze", top_k=0)
    with pytest.raises(ValueError, match="gaze_routing"):
        _config("gaze", routing="everyone")
    with pytest.raises(ValueError, match="attention"):
        dataclasses.replace(_config().decoder, attention="sparse")


def test_pallas_model_matches_xla_forward_gradients_and_decode():
    """``gaze_implementation="pallas"`` (interpreted on CPU) trains and decodes like ``"xla"``."""
    configs = {impl: _config("gaze", implementation=impl, top_k=2) for impl in ("xla", "pallas")}
    inputs = _inputs(configs["xla"], seed=5)
    params = nn.unbox(jax.jit(MultimodalModel(configs["xla"]).init)(jax.random.key(0), inputs))
    params = params["params"]
    valid = np.asarray(inputs.meta.valid)
    targets = np.random.default_rng(6).integers(0, VOCAB, valid.shape)
    weight = valid.astype(np.float32)

    def loss_and_grad(config):
        def loss(params):
            logits = MultimodalModel(config).apply({"params": params}, inputs)
            log_probs = jax.nn.log_softmax(logits)
            picked = jnp.take_along_axis(log_probs, targets[..., None], -1)
            return -jnp.sum(picked[..., 0] * weight) / weight.sum(), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (xla_loss, xla_logits), xla_grads = loss_and_grad(configs["xla"])
    (pallas_loss, pallas_logits), pallas_grads = loss_and_grad(configs["pallas"])
    assert_close_accumulated(np.asarray(pallas_logits)[valid], np.asarray(xla_logits)[valid])
    assert_close_accumulated(pallas_loss, xla_loss)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(pallas_grads), jax.tree.leaves(xla_grads), strict=True
    ):
        error, scale = float(jnp.abs(a - b).max()), float(jnp.abs(b).max())
        # 1e-4 floor: a ViT key bias has an exactly-zero gradient (softmax shift invariance)
        assert error <= 1e-5 * max(scale, 1e-4), (jax.tree_util.keystr(path), error, scale)

    # Prefill the cache with sample 0 minus its last text token, then one bounded decode step
    # (the xla path's cache equality is test_prefill_then_decode_equals_full_forward's).
    first = jax.tree.map(lambda x: x[:1], inputs)
    total = int(valid[0].sum())
    kind = np.asarray(first.meta.kind)
    unrouted = int(((kind == TokenKind.TEXT) | (kind == TokenKind.CONTEXT)).sum())
    slot = total - 1
    assert int(kind[0, slot]) == TokenKind.TEXT
    config = configs["pallas"]
    model = MultimodalModel(config)

    @jax.jit
    def prefill_and_step(params):
        cache = KVCache.empty(config.decoder, batch=1, max_len=total, regions=first.regions)
        prefill, cache = model.apply({"params": params}, _slice(first, slot), cache=cache)
        meta = jax.tree.map(lambda x: x[:, slot : slot + 1], first.meta)
        step, _ = model.apply(
            {"params": params},
            first.input_ids[:, slot : slot + 1],
            meta,
            cache,
            max_unrouted_tokens=unrouted,
            method=MultimodalModel.extend,
        )
        return prefill[0], step[0, 0]

    prefill, step = prefill_and_step(params)
    assert_close_accumulated(prefill, np.asarray(xla_logits)[0, :slot])
    assert_close_accumulated(step, np.asarray(xla_logits)[0, slot])


@pytest.mark.parametrize("region_size", [(2, 2, 1), (2, 2, 2)])
def test_gaze_prefill_in_unit_chunks_equals_one_call(region_size):
    """A prefill cut at unit boundaries (whole frame groups for r_t = 2), then a 3-token text
    extend and decode steps, equals one prefill: logits, region descriptors, next tokens."""
    config = _config("gaze", region_size=region_size, implementation="xla", top_k=2).decoder
    segments = [
        TextSegment(3),
        VisualSegment(4, 4, frames=2),
        TextSegment(2),
        VisualSegment(4, 4, frames=2),
        TextSegment(5),
    ]
    layout = build_layout(segments, region_size, num_context_tokens=2)
    meta, regions = batch_layouts([layout])
    length = layout.length
    embeds = jax.random.normal(jax.random.key(1), (1, length, config.hidden_size)) * 0.5
    model = Decoder(config)
    params = model.init(
        jax.random.key(0), None, inputs_embeds=embeds, token_meta=meta, regions=regions
    )["params"]

    def run(cuts):
        cache = KVCache.empty(config, 1, length, regions=regions)
        logits = []
        for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
            part = jax.tree.map(lambda x, a=start, b=stop: x[:, a:b], meta)
            out, cache = model.apply(
                {"params": params},
                None,
                inputs_embeds=embeds[:, start:stop],
                token_meta=part,
                regions=regions,
                cache=cache,
            )
            logits.append(out)
        return jnp.concatenate(logits, axis=1), cache

    # whole units: a frame group of r_t frames with its context tokens; text on its own
    unit = np.asarray(meta.unit[0])
    group = np.where(unit >= 0, unit // region_size[-1], -1)
    cuts = [0, *np.flatnonzero(group[1:] != group[:-1]) + 1, length]
    assert len(cuts) - 1 == 3 + 4 // region_size[-1]  # 3 text chunks, 4 frames in groups
    text_tail = length - 3  # the last 3 text tokens go as one multi-token extend
    one_logits, one_cache = run([0, length])
    chunk_logits, chunk_cache = run([*cuts[:-1], text_tail, length])
    assert_close_accumulated(chunk_logits, one_logits)
    for one, chunk in zip(one_cache.layers, chunk_cache.layers, strict=True):
        np.testing.assert_allclose(chunk.descriptors, one.descriptors, atol=1e-6)
        assert float(jnp.abs(one.descriptors).min(axis=(-1, -2)).max()) > 0  # all regions set


def test_the_vision_encoder_skips_unit_slots_no_sample_uses():
    """With ``units_per_encode=2`` over 6 slots and 2, 3, 1 real units, slots 4-5 are never
    encoded (their tokens stay zero); logits and gradients equal encoding every slot (random
    pixels in the padding slots)."""
    base = _config()
    config = dataclasses.replace(
        base,
        vit=dataclasses.replace(base.vit, depth=1),
        decoder=dataclasses.replace(base.decoder, num_layers=1),
    )
    inputs = pack_batch(_samples(0), config.geometry, length=96, max_units=6, num_regions=12)[0]
    rng = np.random.default_rng(1)
    units = np.array(inputs.units)
    for sample, real in enumerate((2, 3, 1)):
        units[sample, real:] = rng.uniform(-1, 1, units[sample, real:].shape)
    inputs = inputs.replace(units=jnp.asarray(units))
    model = MultimodalModel(config)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), inputs))["params"]
    params = jax.tree.map(  # random parameters without compiling the initialisers
        lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), shapes
    )
    chunked = MultimodalModel(dataclasses.replace(config, units_per_encode=2))
    weights = jnp.asarray(rng.normal(size=(3, 96, VOCAB)), jnp.float32)

    def loss(module):
        return jax.value_and_grad(lambda p: (module.apply({"params": p}, inputs) * weights).sum())

    (want, want_grads), (got, got_grads) = (jax.jit(loss(m))(params) for m in (model, chunked))
    assert_close_accumulated(got, want, rtol=1e-6)
    want_leaves = dict(jax.tree_util.tree_leaves_with_path(want_grads))
    for path, g in jax.tree_util.tree_leaves_with_path(got_grads):
        assert_close_accumulated(g, want_leaves[path], str(path), rtol=1e-6)
    assert np.abs(np.asarray(want_grads["vision"]["embedding"]["kernel"])).max() > 0

    encode = jax.jit(partial(chunked.apply, method="encode_units"))
    tokens = np.asarray(encode({"params": params}, inputs.units, jnp.array([2, 3, 1])))
    per_unit = config.tokens_per_unit
    assert tokens[:, : 4 * per_unit].any(axis=-1).all()
    assert not tokens[:, 4 * per_unit :].any()

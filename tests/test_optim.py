"""Regex parameter groups: stage 1 trains only what it names; multipliers scale updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gazejax.optim import make_optimizer, warmup_cosine

PARAMS = {
    "vision": {"block": {"kernel": jnp.ones((3, 4))}},
    "projector": {"fc1": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones((5,))}},
    "context_tokens": jnp.ones((2, 5)),
    "decoder": {"layers_0": {"kernel": jnp.ones((5, 5))}},
}


def _grads(seed=0):
    leaves, tree = jax.tree.flatten(PARAMS)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _step(tx, grads):
    state = tx.init(PARAMS)
    updates, state = tx.update(grads, state, PARAMS)
    return updates, state


def test_stage1_updates_only_projector_and_context_tokens():
    tx, _ = make_optimizer(
        PARAMS, learning_rate=1e-2, total_steps=10, trainable=("projector/.*", "context_tokens")
    )
    updates, state = _step(tx, _grads())
    changed = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    assert changed["projector"]["fc1"] == {"kernel": True, "bias": True}
    assert changed["context_tokens"]
    assert not changed["vision"]["block"]["kernel"] and not changed["decoder"]["layers_0"]["kernel"]
    state_sizes = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size"))
    trainable_size = 4 * 5 + 5 + 2 * 5
    assert state_sizes < 3 * trainable_size + 8  # Adam moments for trainable params only


def test_clipping_sees_only_trainable_gradients():
    grads = jax.tree.map(lambda g: 100.0 * g, _grads(1))
    grads["vision"]["block"]["kernel"] = 1e6 * jnp.ones((3, 4))
    tx, _ = make_optimizer(
        PARAMS,
        learning_rate=1.0,
        total_steps=10,
        clip_norm=1.0,
        b1=0.0,
        trainable=("projector/.*",),
    )
    updates, _ = _step(tx, grads)
    assert float(jnp.abs(updates["vision"]["block"]["kernel"]).max()) == 0.0
    # Had the frozen 1e6 gradient entered the global norm, clipping would shrink the trainable
    # gradients ~1e4 times more, and Adam's epsilon would show it at this tolerance.
    grads_small = jax.tree.map(lambda g: g, grads)
    grads_small["vision"]["block"]["kernel"] = jnp.zeros((3, 4))
    expected, _ = _step(tx, grads_small)
    np.testing.assert_allclose(
        updates["projector"]["fc1"]["kernel"], expected["projector"]["fc1"]["kernel"], rtol=1e-6
    )


def test_learning_rate_multiplier_scales_the_update():
    tx, _ = make_optimizer(
        PARAMS,
        learning_rate=1e-2,
        total_steps=10,
        clip_norm=None,
        lr_multipliers={"vision/.*": 0.1},
    )
    updates, _ = _step(tx, jax.tree.map(jnp.ones_like, PARAMS))
    ratio = updates["vision"]["block"]["kernel"] / updates["decoder"]["layers_0"]["kernel"][:3, :4]
    np.testing.assert_allclose(ratio, 0.1, rtol=1e-5)


def test_unknown_trainable_pattern_is_named():
    with pytest.raises(ValueError, match="projektor"):
        make_optimizer(PARAMS, learning_rate=1.0, total_steps=1, trainable=("projektor/.*",))


def test_warmup_then_cosine():
    schedule = warmup_cosine(1.0, warmup_steps=10, total_steps=110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 0.5)
    np.testing.assert_allclose(float(schedule(10)), 1.0)
    np.testing.assert_allclose(float(schedule(60)), 0.5, atol=1e-6)
    assert float(schedule(110)) < 1e-6

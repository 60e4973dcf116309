"""python -m gazejax.evaluate: results schema, methods at full budget equal dense, eviction."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gazejax import evaluate as ev
from gazejax.checkpointing import Checkpointer
from gazejax.configuration import base_config
from gazejax.data.packing import pack_batch
from gazejax.data.vocab import build_tokenizer, vocabulary
from gazejax.gaze.regions import TokenKind
from gazejax.generate import load_checkpoint
from gazejax.models.from_config import multimodal_config
from gazejax.models.mllm import MultimodalModel
from gazejax.train import TrainState

SCHEMA = (
    "method",
    "top_k",
    "kv_size",
    "dense_kv_size",
    "benchmark",
    "metric",
    "score",
    "num_examples",
)


def _train_config():
    config = base_config(stage=2, attention="gaze")
    config.model.vit = {"variant": "mu/4", "patch_size": 8, "image_size": 32}  # 4x4 tokens
    config.model.decoder = dict(
        vocab_size=len(vocabulary()),
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    config.model.gaze.top_k = 1
    config.model.num_context_tokens = 2
    config.model.region_size = (2, 2, 1)  # 4 regions per unit
    config.data.synthetic = dict(
        image_size=32,
        grid=2,
        min_objects=1,
        max_objects=2,
        object_sizes=(0.6, 0.85),
        jitter=False,
        video_frames=2,
    )
    config.data.system_prompt = ""
    config.batch_size = 4
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir of a random tiny gaze model: config.json + checkpoints/."""
    root = tmp_path_factory.mktemp("eval")
    config = _train_config()
    (root / "config.json").write_text(config.to_json_best_effort(indent=2))
    model_config = multimodal_config(config.model)
    raw = json.loads((root / "config.json").read_text())
    examples, _ = ev.synthetic_benchmark(raw, build_tokenizer(), 1)
    inputs, _ = pack_batch([examples[0].items], model_config, *ev._shape(model_config, examples))
    params = nn.unbox(jax.jit(MultimodalModel(model_config).init)(jax.random.key(0), inputs))
    params = jax.tree.map(lambda x: x * 4.0, params["params"])  # sharper attention
    state = TrainState(jnp.int32(3), params, optax.adam(1e-3).init(params))
    checkpointer = Checkpointer(str(root), every_steps=1, max_to_keep=1)
    checkpointer.save(3, state, config.to_dict(), force=True)
    checkpointer.close()
    return root


def test_budget_conversions():
    assert ev.gaze_top_k(0.22, 9) == 2 and ev.gaze_top_k(0.11, 36) == 4
    assert ev.gaze_top_k(0.01, 9) == 1 and ev.gaze_top_k(1.0, 9) == 9
    assert ev.pool_window((6, 6), 0.25) == (2, 2)
    assert ev.pool_window((6, 6), 0.11) == (3, 3)
    assert ev.pool_window((6, 6), 1.0) == (1, 1)
    assert ev.pool_window((6, 6), 0.5) == (1, 2)
    tokens = jnp.arange(9, dtype=jnp.float32).reshape(1, 9, 1)  # a 3x3 grid
    pooled = ev.pool_tokens(tokens, (3, 3), (2, 2))[0, :, 0]
    np.testing.assert_allclose(pooled, [(0 + 1 + 3 + 4) / 4, (2 + 5) / 2, (6 + 7) / 2, 8])
    with pytest.raises(ValueError, match="unknown method"):
        ev.parse_methods(["nope"], [0.5])


def test_cli_writes_results(workdir, tmp_path):
    out = tmp_path / "eval"
    argv = ["--workdir", str(workdir), "--methods", "dense,gaze,evict_question"]
    argv += ["--budgets", "0.25,1", "--examples", "9", "--out", str(out), "--no-progress"]
    assert ev.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().count("| gaze@") == 2
    assert (out / "score_vs_kv.png").stat().st_size > 0
    records = {r["label"]: r for r in results["records"]}
    assert list(records) == [
        "dense",
        "gaze@0.25",
        "gaze@1",
        "evict_question@0.25",
        "evict_question@1",
    ]
    for r in records.values():
        assert all(key in r for key in SCHEMA), r
        assert r["benchmark"] == "synthetic" and r["num_examples"] == 9
        assert set(r["by_family"]) == set(ev.FAMILIES)
        assert len(r["by_task"]) == 9 and r["seconds"] > 0
    dense = records["dense"]
    assert dense["visual_kv_fraction"] == 1.0 and dense["context_kv"] > 0
    # Image: 4 regions of 4 tokens; video: 2 frames, 8 regions.
    assert records["gaze@0.25"]["top_k"] == {"image": 1, "video": 2}
    assert records["gaze@1"]["top_k"] == {"image": 4, "video": 8}
    for label in ("gaze@0.25", "evict_question@0.25"):
        assert records[label]["visual_kv_fraction"] == pytest.approx(0.25)
    for label in ("gaze@1", "evict_question@1"):
        assert records[label]["score"] == dense["score"]
        assert records[label]["by_task"] == dense["by_task"]

    # Deterministic: the same examples and scores again.
    checkpoint = load_checkpoint(workdir)
    raw = json.loads((workdir / "config.json").read_text())
    again = ev.sweep(checkpoint, raw, [ev.Method("dense")], 9, progress=False)["records"][0]
    assert again["by_task"] == dense["by_task"] and again["kv_size"] == dense["kv_size"]


def test_full_budget_methods_equal_dense_and_eviction_changes_answers(workdir):
    checkpoint = load_checkpoint(workdir)
    raw = json.loads((workdir / "config.json").read_text())
    examples, _ = ev.synthetic_benchmark(raw, checkpoint.tokenizer, 9)
    video = [e for e in examples if e.bucket == "video"]
    base, params = checkpoint.config, checkpoint.params
    runner = {
        label: ev.make_runner(base, ev.Method(*label))
        for label in (("dense",), ("gaze", 1.0), ("evict_question", 1.0), ("dense_reduced", 1.0))
    }
    small = ev.make_runner(base, ev.Method("evict_question", 0.1))
    dense_cfg = runner[("dense",)].config
    shape = ev._shape(dense_cfg, video)
    inputs, targets = pack_batch([e.items for e in video], dense_cfg, *shape)
    real = np.asarray(inputs.meta.kind) != TokenKind.PADDING

    def logits(r, top_k=None):
        return np.asarray(jax.jit(r.logits, static_argnums=3)(params, inputs, targets, top_k))

    dense = logits(runner[("dense",)])
    gaze = logits(runner[("gaze", 1.0)], shape[2])  # K = every region: dense, up to rounding
    np.testing.assert_allclose(gaze[real], dense[real], rtol=1e-4, atol=1e-4)
    decode = np.asarray(targets) >= 0
    np.testing.assert_array_equal(gaze[decode].argmax(-1), dense[decode].argmax(-1))
    np.testing.assert_allclose(logits(runner[("evict_question", 1.0)]), dense, rtol=1e-4, atol=1e-4)
    reduced = runner[("dense_reduced", 1.0)]
    assert reduced.pool == (1, 1) and reduced.config.unit_grid == base.unit_grid
    np.testing.assert_allclose(logits(reduced)[real], dense[real], rtol=1e-4, atol=1e-4)

    evicted = logits(small)
    meta = inputs.meta
    first = np.where(decode, np.asarray(meta.position), 10**6).min(-1, keepdims=True)
    prefill = real & (np.asarray(meta.position) < first)
    # Prefill untouched (same values up to XLA's rounding); the answers change.
    np.testing.assert_allclose(evicted[prefill], dense[prefill], rtol=1e-4, atol=1e-4)
    assert np.abs(evicted[decode] - dense[decode]).max() > 1e-3

    # Every layer keeps round(0.1 * 32) = 3 visual entries per sample, chosen per layer.
    model = MultimodalModel(dense_cfg)
    _, kept = jax.jit(lambda p, i, t: ev.evict_masks(model, p, i, t, 0.1))(params, inputs, targets)
    np.testing.assert_array_equal(np.asarray(kept).sum(-1), 3)

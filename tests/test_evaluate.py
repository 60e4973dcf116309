"""python -m gazejax.evaluate and gazejax.eval: results schema, methods at full budget equal
dense, eviction."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gazejax import evaluate as evaluate_cli
from gazejax.data.images import read_image
from gazejax.data.packing import Text, pack_batch
from gazejax.data.pipeline import example_items
from gazejax.data.records import DataError
from gazejax.data.vocab import build_tokenizer
from gazejax.eval.benchmarks import jsonl
from gazejax.eval.benchmarks.synthetic import synthetic_benchmark
from gazejax.eval.examples import Example, batch_shape
from gazejax.eval.methods import make_method, parse_methods
from gazejax.eval.methods.blind import blind_mask
from gazejax.eval.methods.dense_reduced import pool_tokens, pool_window
from gazejax.eval.methods.evict_question import evict_masks
from gazejax.eval.methods.gaze import gaze_top_k
from gazejax.eval.scoring import FAMILIES
from gazejax.eval.sweep import sweep
from gazejax.inference import load_checkpoint, with_attention
from gazejax.losses import answer_turns, turn_scores
from gazejax.models.from_config import multimodal_config
from gazejax.models.mllm import MultimodalModel
from kernels.gaze_attention import TokenKind
from tests.tolerances import assert_close_accumulated
from tests.workdirs import save_random_workdir, tiny_gaze_config

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


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir of a random tiny gaze model: config.json + checkpoints/."""
    root = tmp_path_factory.mktemp("eval")
    config = tiny_gaze_config()
    model_config = multimodal_config(config.model)
    raw = json.loads(config.to_json_best_effort())
    examples, _ = synthetic_benchmark(raw, build_tokenizer(), 1)
    shape = batch_shape(model_config, examples)
    inputs, _ = pack_batch([examples[0].items], model_config.geometry, *shape)
    return save_random_workdir(root, config, inputs, scale=4.0)  # sharper attention


def test_budget_conversions():
    assert gaze_top_k(0.22, 9) == 2 and gaze_top_k(0.11, 36) == 4
    assert gaze_top_k(0.01, 9) == 1 and gaze_top_k(1.0, 9) == 9
    assert pool_window((6, 6), 0.25) == (2, 2)
    assert pool_window((6, 6), 0.11) == (3, 3)
    assert pool_window((6, 6), 1.0) == (1, 1)
    assert pool_window((6, 6), 0.5) == (1, 2)
    tokens = jnp.arange(9, dtype=jnp.float32).reshape(1, 9, 1)  # a 3x3 grid
    pooled = pool_tokens(tokens, (3, 3), (2, 2))[0, :, 0]
    np.testing.assert_allclose(pooled, [(0 + 1 + 3 + 4) / 4, (2 + 5) / 2, (6 + 7) / 2, 8])
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods(["nope"], [0.5])


def test_each_answer_of_a_conversation_is_scored_on_its_own():
    """Answers are runs of supervised slots; each gets its own exact match and log-likelihood."""
    targets = np.array([[-1, 5, 6, -1, -1, 7, -1, 2], [-1, -1, 3, -1, -1, -1, -1, -1]], np.int32)
    logits = np.random.default_rng(0).normal(size=(2, 8, 9)).astype(np.float32)
    logits[0, [1, 2, 5], [5, 6, 7]] += 50.0  # the first two answers right, the third wrong
    logits[0, 7, 2] -= 50.0
    turn, (exact, loglik, answered) = jax.jit(lambda x, t: (answer_turns(t), turn_scores(x, t, 2)))(
        logits, targets
    )
    np.testing.assert_array_equal(
        turn, [[-1, 0, 0, -1, -1, 1, -1, 2], [-1, -1, 0, -1, -1, -1, -1, -1]]
    )
    np.testing.assert_array_equal(exact, [[True, True], [False, False]])
    np.testing.assert_array_equal(answered, [[True, True, True], [True, False, False]])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert loglik[0, 0] == pytest.approx(logp[0, 1, 5] + logp[0, 2, 6], rel=1e-5)
    assert loglik[0, 1] == pytest.approx(logp[0, 5, 7], rel=1e-5)
    assert loglik[1, 0] == pytest.approx(logp[1, 2, 3], rel=1e-5)


def test_cli_writes_results(workdir, tmp_path):
    """Conversations of 2 turns (9, one per first task): every answer scored, per turn."""
    out = tmp_path / "eval"
    methods = "dense,gaze,evict_question,blind"
    argv = ["--workdir", str(workdir), "--methods", methods, "--turns", "2"]
    argv += ["--budgets", "0.25,1", "--examples", "9", "--out", str(out), "--no-progress"]
    assert evaluate_cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert table.count("| gaze@") == 2 * 3  # overall, by turn, turns >= 2
    assert "### synthetic by turn (exact match, %)" in table
    png = (out / "score_vs_kv.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(out / "score_vs_kv.png") as image:
        image.verify()
    assert results["benchmarks"]["synthetic"]["turns"] == 2
    records = {r["label"]: r for r in results["records"]}
    assert list(records) == [
        "dense",
        "gaze@0.25",
        "gaze@1",
        "evict_question@0.25",
        "evict_question@1",
        "blind",
    ]
    for r in records.values():
        assert all(key in r for key in SCHEMA), r
        assert r["benchmark"] == "synthetic" and r["num_examples"] == 18
        assert set(r["by_family"]) == set(FAMILIES)
        assert len(r["by_task"]) == 9 and r["seconds"] > 0
        assert {t: x["num_examples"] for t, x in r["by_turn"].items()} == {"1": 9, "2": 9}
        assert r["later_turns"]["num_examples"] == 9
        p = r["score"]
        assert r["stderr"] == pytest.approx(np.sqrt(p * (1 - p) / 18))
    dense = records["dense"]
    assert dense["visual_kv_fraction"] == 1.0 and dense["context_kv"] > 0
    assert records["blind"]["kv_size"] == 0 and records["blind"]["top_k"] is None
    prior = results["benchmarks"]["synthetic"]["majority_answer"]  # no model: one row each
    assert table.count("| majority answer | 0.0 | 0.0 |") == 3
    assert prior["num_examples"] == 18 and set(prior["by_turn"]) == {"1", "2"}
    assert set(prior["answers"]) == set(dense["by_task"])
    # Image: 4 regions of 4 tokens; video: 2 frames, 8 regions.
    assert records["gaze@0.25"]["top_k"] == {"image": 1, "video": 2}
    assert records["gaze@1"]["top_k"] == {"image": 4, "video": 8}
    for label in ("gaze@0.25", "evict_question@0.25"):
        assert records[label]["visual_kv_fraction"] == pytest.approx(0.25)
    for label in ("gaze@1", "evict_question@1"):  # per turn, every method at full budget = dense
        assert records[label]["score"] == dense["score"]
        assert records[label]["by_task"] == dense["by_task"]
        for t in ("1", "2"):
            got, want = records[label]["by_turn"][t], dense["by_turn"][t]
            assert got["score"] == want["score"]
            assert {f: x["score"] for f, x in got["by_family"].items()} == {
                f: x["score"] for f, x in want["by_family"].items()
            }

    # Deterministic: the same examples and scores again.
    checkpoint = load_checkpoint(workdir)
    raw = json.loads((workdir / "config.json").read_text())
    again = sweep(checkpoint, raw, [make_method("dense")], 9, progress=False, turns=2)
    again = again["records"][0]
    assert again["by_task"] == dense["by_task"] and again["kv_size"] == dense["kv_size"]


def test_full_budget_methods_equal_dense_and_eviction_changes_answers(workdir):
    """On 2-turn conversations: at full budget every method's logits equal dense at every
    answer of every turn; eviction happens once, at the end of the first question's prefill."""
    checkpoint = load_checkpoint(workdir)
    raw = json.loads((workdir / "config.json").read_text())
    examples, _ = synthetic_benchmark(raw, checkpoint.tokenizer, 9, turns=2)
    video = [e for e in examples if e.bucket == "video"]
    base, params = checkpoint.config, checkpoint.params
    runner = {
        label: make_method(*label).runner(base)
        for label in (("dense",), ("gaze", 1.0), ("evict_question", 1.0), ("dense_reduced", 1.0))
    }
    small = make_method("evict_question", 0.1).runner(base)
    dense_cfg = runner[("dense",)].config
    shape = batch_shape(dense_cfg, video)
    inputs, targets = pack_batch([e.items for e in video], dense_cfg.geometry, *shape)
    real = np.asarray(inputs.meta.kind) != TokenKind.PADDING

    def logits(r, top_k=None):
        return np.asarray(jax.jit(r.logits, static_argnums=3)(params, inputs, targets, top_k))

    dense = logits(runner[("dense",)])
    gaze = logits(runner[("gaze", 1.0)], shape[2])  # K = every region: dense, up to rounding
    assert_close_accumulated(gaze[real], dense[real])
    decode = np.asarray(targets) >= 0
    np.testing.assert_array_equal(gaze[decode].argmax(-1), dense[decode].argmax(-1))
    assert_close_accumulated(logits(runner[("evict_question", 1.0)]), dense)
    reduced = runner[("dense_reduced", 1.0)]
    assert reduced.details == {"pool": [1, 1], "pooled_grid": list(base.unit_grid)}
    assert reduced.config.unit_grid == base.unit_grid
    assert_close_accumulated(logits(reduced)[real], dense[real])

    evicted = logits(small)
    meta = inputs.meta
    first = np.where(decode, np.asarray(meta.position), 10**6).min(-1, keepdims=True)
    prefill = real & (np.asarray(meta.position) < first)
    # Prefill untouched (same values up to XLA's rounding); the answers change.
    assert_close_accumulated(evicted[prefill], dense[prefill])
    assert np.abs(evicted[decode] - dense[decode]).max() > 1e-3

    # Every layer keeps round(0.1 * 32) = 3 visual entries per sample, chosen per layer.
    model = MultimodalModel(dense_cfg)
    masks_of = jax.jit(lambda p, i, t: evict_masks(model, p, i, t, 0.1))
    masks, kept = (np.asarray(x) for x in masks_of(params, inputs, targets))
    np.testing.assert_array_equal(kept.sum(-1), 3)

    # Evicted once: the same entries are kept when the conversation stops after its first
    # answer, and every later query (turn 1's answer, turn 2's question and answer) sees
    # exactly those visual entries.
    first_turn = [_first_turn_only(e.items) for e in video]
    short, short_targets = pack_batch(first_turn, dense_cfg.geometry, *shape)
    _, kept_first = (np.asarray(x) for x in masks_of(params, short, short_targets))
    np.testing.assert_array_equal(kept_first, kept)
    turn = np.asarray(answer_turns(targets))
    assert (turn == 1).any(-1).all()  # every sample has its second answer
    visual = np.asarray(meta.kind) == TokenKind.VISUAL
    for b in range(len(video)):
        later = np.asarray(meta.position[b]) >= first[b]
        assert later.sum() > (turn[b] >= 0).sum()  # turn 2's question too
        seen = masks[:, b][:, later][..., visual[b]]  # [layers, later queries, visual]
        np.testing.assert_array_equal(
            seen, np.broadcast_to(kept[:, b, None][..., visual[b]], seen.shape)
        )


def test_blind_answers_without_the_picture(workdir):
    """blind: no text query reads a visual or context entry, so other pixels leave every text
    slot's logits as they were (dense's change); visual and context slots are dense's."""
    checkpoint = load_checkpoint(workdir)
    raw = json.loads((workdir / "config.json").read_text())
    examples, _ = synthetic_benchmark(raw, checkpoint.tokenizer, 9, turns=2)
    image = [e for e in examples if e.bucket == "image"]
    blind, dense = (make_method(name).runner(checkpoint.config) for name in ("blind", "dense"))
    shape = batch_shape(dense.config, image)
    inputs, targets = pack_batch([e.items for e in image], dense.config.geometry, *shape)
    assert checkpoint.config.num_context_tokens > 0
    noise = jax.random.uniform(jax.random.key(3), inputs.units.shape, minval=-1.0, maxval=1.0)
    other = dataclasses.replace(inputs, units=noise.astype(inputs.units.dtype))

    def logits(r, x):
        return np.asarray(jax.jit(r.logits, static_argnums=3)(checkpoint.params, x, targets, None))

    kind = np.asarray(inputs.meta.kind)
    text = kind == TokenKind.TEXT
    pictured = (kind == TokenKind.VISUAL) | (kind == TokenKind.CONTEXT)
    seen = np.asarray(blind_mask(inputs))
    assert not (seen & text[:, :, None] & pictured[:, None, :]).any()
    blind_logits, dense_logits = logits(blind, inputs), logits(dense, inputs)
    np.testing.assert_array_equal(logits(blind, other)[text], blind_logits[text])
    assert np.abs(logits(dense, other)[text] - dense_logits[text]).max() > 1e-3
    assert_close_accumulated(blind_logits[pictured], dense_logits[pictured])


def _first_turn_only(items: list) -> list:
    """A packed conversation cut after its first answer's ``<|im_end|>``."""
    *head, text = items
    supervised = np.asarray(text.targets) >= 0
    start = int(np.argmax(supervised))
    end = start + int(np.argmin(supervised[start:]))  # the answer's <|im_end|>
    return [*head, Text(text.ids[: end + 1], text.targets[: end + 1])]


# --- Generic JSONL benchmarks ------------------------------------------------------------------


@pytest.fixture(scope="module")
def jsonl_file(tmp_path_factory):
    """A small JSONL benchmark: 3 multiple-choice lines and 2 open-ended ones (one a video, a
    folder of frames), with PNGs drawn here."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("bench")
    for name, color, size in (
        ("a", "red", (40, 24)),
        ("b", "blue", (32, 32)),
        ("c", "green", (24, 40)),
    ):
        image = Image.new("RGB", size, "black")
        ImageDraw.Draw(image).rectangle([2, 2, 14, 14], fill=color)
        image.save(root / f"{name}.png")
    (root / "clip").mkdir()
    for t in range(3):
        image = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(image).ellipse([4 * t, 4, 4 * t + 10, 14], fill="purple")
        image.save(root / "clip" / f"f{t}.png")
    lines = [
        {
            "id": "mc1",
            "question": "what color is the square?",
            "image": "a.png",
            "options": ["red", "blue", "green"],
            "answer": "A",
        },
        {
            "question": "<image>\nhow many objects?",
            "image": "b.png",
            "options": ["one", "two"],
            "answer": "two",
        },
        {
            "question": "which shape is the object?",
            "image": "c.png",
            "options": ["square", "circle", "triangle", "cross"],
            "answer": "(C)",
        },
        {"question": "what color is the square?", "image": "b.png", "answer": "blue"},
        {
            "question": "what shape appears in the first frame?",
            "video": "clip",
            "answer": "a purple circle",
        },
    ]
    path = root / "mini.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    return path


@pytest.mark.parametrize(
    "options,message",
    [
        (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
        (["--budgets", "0"], "budgets are fractions in (0, 1], got 0.0"),
    ],
)
def test_options_are_used_as_given_or_refused(workdir, tmp_path, capsys, options, message):
    argv = ["--workdir", str(workdir), "--methods", "gaze", "--examples", "2", "--no-progress"]
    assert evaluate_cli.main([*argv, "--out", str(tmp_path), *options]) == 1
    assert message in capsys.readouterr().err


def test_jsonl_spec_and_bad_lines(tmp_path):
    assert jsonl.JsonlSpec.parse("jsonl:x/mme.jsonl") == jsonl.JsonlSpec("x/mme.jsonl", "mme")
    assert jsonl.JsonlSpec.parse("jsonl:x/mme.jsonl:MME") == jsonl.JsonlSpec("x/mme.jsonl", "MME")
    good = {"question": "what color?", "options": ["red", "blue"], "answer": "B"}
    bad = [
        ("{not json", "malformed JSON"),
        ({**good, "answer": "C"}, "neither an option's text nor a letter A-B"),
        ({**good, "options": ["red"]}, "'options'"),
        ({"question": "what color?"}, "'answer'"),
        ({**good, "image": "a.png", "video": "v.mp4"}, "not both"),
        ({**good, "image": "a.png", "question": "<image><image> what?"}, "placeholder"),
        ({**good, "colour": 1}, "unknown key"),
    ]
    for value, message in bad:
        path = tmp_path / "bad.jsonl"
        text = value if isinstance(value, str) else json.dumps(value)
        path.write_text(json.dumps(good) + "\n\n" + text + "\n")
        with pytest.raises(DataError, match=f"bad.jsonl:3: .*{message}"):
            jsonl.read_jsonl_questions(path)
    questions = jsonl.read_jsonl_questions(path, limit=1)
    assert len(questions) == 1 and questions[0].answer == 1 and questions[0].id == "bad.jsonl:1"


def test_jsonl_benchmark(workdir, jsonl_file, tmp_path):
    out = tmp_path / "eval"
    argv = ["--workdir", str(workdir), "--methods", "dense,gaze,evict_question"]
    argv += ["--budgets", "1", "--benchmarks", f"jsonl:{jsonl_file}:mini"]
    argv += ["--out", str(out), "--no-progress"]
    assert evaluate_cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    info = results["benchmarks"]["mini"]
    assert (info["questions"], info["multiple_choice"], info["open_ended"]) == (5, 3, 2)
    assert set(info["scoring"]) == {"option_loglik_accuracy", "exact_match"}
    assert info["questions_with_unknown_tokens"] == 0
    table = (out / "results.md").read_text()
    assert "### mini (option log-likelihood accuracy, %)" in table
    assert "### mini (exact match, %)" in table
    records = {(r["label"], r["metric"]): r for r in results["records"]}
    labels = ["dense", "gaze@1", "evict_question@1"]
    assert list(records) == [
        (l, m) for l in labels for m in ("option_loglik_accuracy", "exact_match")
    ]
    for (_, metric), r in records.items():
        assert all(key in r for key in SCHEMA), r
        assert r["benchmark"] == "mini"
        assert r["num_examples"] == (3 if metric == "option_loglik_accuracy" else 2)
    assert set(records["dense", "exact_match"]["by_family"]) == {"image", "video"}
    assert records["gaze@1", "exact_match"]["top_k"] == {"image": 4, "video": 8}  # 2 of 3 frames
    assert info["max_frames"] == 2

    # Independent: each option's summed log-probability (its tokens and <|im_end|>) from one
    # full dense forward of the conversation, one option at a time.
    checkpoint = load_checkpoint(workdir)
    config = with_attention(checkpoint.config, "dense")
    model = MultimodalModel(config)
    forward = jax.jit(lambda p, i: model.apply({"params": p}, i))
    lines = [json.loads(x) for x in jsonl_file.read_text().splitlines() if x.strip()]
    dense = records["dense", "option_loglik_accuracy"]
    correct = []
    for line, got in zip([x for x in lines if "options" in x], dense["per_example"], strict=True):
        image = read_image(jsonl_file.parent / line["image"], config.vit.image_size)[None]
        question = line["question"]
        if "<image>" not in question:
            question = "<image>\n" + question
        logliks = []
        for option in line["options"]:
            conversation = [{"from": "human", "value": question}, {"from": "gpt", "value": option}]
            items = example_items(
                conversation, [image], checkpoint.tokenizer, "<image>", checkpoint.system_prompt
            )
            shape = batch_shape(config, [Example(items, "", "", "")])
            inputs, targets = pack_batch([items], config.geometry, *shape)
            logp = jax.nn.log_softmax(forward(checkpoint.params, inputs).astype(jnp.float32))
            targets = np.asarray(targets[0])
            supervised = np.flatnonzero(targets >= 0)
            assert len(supervised) == 2  # the option (one word) and <|im_end|>
            logliks.append(float(np.asarray(logp)[0, supervised, targets[supervised]].sum()))
        assert_close_accumulated(got["logliks"], logliks)
        chosen = int(np.argmax(logliks))
        assert got["choice"] == "ABCD"[chosen]
        answer = line["answer"].strip("()")
        truth = line["options"].index(answer) if answer in line["options"] else "ABCD".index(answer)
        correct.append(chosen == truth)
        assert got["correct"] == correct[-1]
    assert dense["score"] == pytest.approx(np.mean(correct))

    # Gaze with every region (and eviction keeping everything) score as dense.
    for label in ("gaze@1", "evict_question@1"):
        for metric in ("option_loglik_accuracy", "exact_match"):
            a, b = records[label, metric], records["dense", metric]
            assert a["score"] == b["score"]
            key = "logliks" if metric == "option_loglik_accuracy" else "loglik"
            assert_close_accumulated(
                np.hstack([e[key] for e in a["per_example"]]),
                np.hstack([e[key] for e in b["per_example"]]),
            )
            assert [e["correct"] for e in a["per_example"]] == [
                e["correct"] for e in b["per_example"]
            ]

    # A missing image: a DataError naming the line that asks for it.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(jsonl_file.read_text().replace('"c.png"', '"missing.png"'))
    raw = json.loads((workdir / "config.json").read_text())
    with pytest.raises(DataError, match=r"bad.jsonl:3: id 'bad.jsonl:3': .*missing.png"):
        sweep(
            checkpoint,
            raw,
            [make_method("dense")],
            1,
            [f"jsonl:{bad}"],
            progress=False,
            image_root=str(jsonl_file.parent),
        )

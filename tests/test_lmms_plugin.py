"""The lmms-eval model ``gazejax`` on local tasks the test writes (JSONL docs, PNG images, a
folder-of-frames video, task YAMLs; no downloads): log-likelihoods equal a direct forward of
the same weights, generations equal a no-cache greedy re-run, and lmms-eval's metrics follow."""

from __future__ import annotations

import functools
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from lmms_eval import evaluator
from lmms_eval.api.instance import Instance, unwrap_generation_output
from lmms_eval.models import get_model
from lmms_eval.tasks import TaskManager
from PIL import Image

from gazejax import inference
from gazejax.data.packing import Text
from gazejax.data.vocab import IM_END_TOKEN, build_tokenizer
from gazejax.lmms.model import GazeJaxLMM, cut_at
from gazejax.models.from_config import multimodal_config
from gazejax.models.mllm import MultimodalModel
from kernels.gaze_attention import TokenKind
from tests.tolerances import assert_close_accumulated
from tests.workdirs import greedy_reference, save_random_workdir, tiny_gaze_config

QUESTIONS = ("what color is the square?", "what shape is it?", "is the circle big?", "count.")
OPTIONS = ("red", "blue square", "green")
MAX_NEW_TOKENS = 3
TASK_UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    """PIL images for image docs, the frames folder's path for the video doc."""
    if doc["video"]:
        return [doc["video"]]
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_choice(doc):
    return doc["options"]
'''


def _task_yaml(name: str, data: str, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\ndoc_to_visual: !function utils.doc_to_visual\n"
        'doc_to_text: "{{question}}"\n' + body
    )


MC_BODY = """output_type: multiple_choice
doc_to_choice: !function utils.doc_to_choice
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_BODY = f"""output_type: generate_until
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  until: ["<|im_end|>"]
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def _png(path, rng, size=(40, 36)) -> str:
    Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A random tiny gaze workdir and its docs: three images and one 2-frame video."""
    root = tmp_path_factory.mktemp("lmms")
    rng = np.random.default_rng(7)
    (root / "frames").mkdir()
    for i in range(2):
        _png(root / "frames" / f"f{i}.png", rng)
    docs = []
    for i, question in enumerate(QUESTIONS):
        video = str(root / "frames") if i == 3 else ""
        image = "" if video else _png(root / f"img{i}.png", rng, (40 + 8 * i, 36))
        docs.append(
            {"question": question, "image": image, "video": video, "options": list(OPTIONS)}
        )
    config = tiny_gaze_config()
    workdir = root / "workdir"
    workdir.mkdir()
    model_config = multimodal_config(config.model)
    visuals = inference.load_visuals([docs[0]["image"]], image_size=model_config.vit.image_size)
    prompt = inference.build_prompt(model_config, build_tokenizer(), "hi", visuals)
    save_random_workdir(workdir, config, prompt.inputs, scale=4.0)  # sharper attention
    return root, workdir, docs


def _visuals(checkpoint, doc):
    size = checkpoint.config.vit.image_size
    if doc["video"]:
        return inference.load_visuals(videos=[doc["video"]], image_size=size, max_frames=2)
    return inference.load_visuals([doc["image"]], image_size=size)


@functools.cache
def _forward(config, top_k):
    model = MultimodalModel(config)
    return jax.jit(lambda params, inputs: model.apply({"params": params}, inputs, top_k=top_k))


def _reference_loglik(checkpoint, attention, top_k, doc, answer) -> tuple[float, bool]:
    """Sum of log p(answer token | everything before it) from one full forward, the slots of
    the answer found by position (an independent path from the plugin's targets)."""
    config = inference.with_attention(checkpoint.config, attention)
    tokenizer = checkpoint.tokenizer
    items = inference.prompt_items(tokenizer, doc["question"], _visuals(checkpoint, doc), "")
    ids = tokenizer.encode(answer, add_special_tokens=False).ids
    items = [*items, Text(np.asarray(ids, np.int32))]
    full = inference.pack_prompt(config, items, pad_multiple=64)
    logits = _forward(config, top_k)(checkpoint.params, full.inputs)[0]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1))
    kind, position = (np.asarray(x[0]) for x in (full.inputs.meta.kind, full.inputs.meta.position))
    slot = {int(p): s for s, p in enumerate(position) if kind[s] != TokenKind.PADDING}
    first = max(slot) - len(ids)  # the position whose logits predict the first answer token
    rows = [slot[first + j] for j in range(len(ids))]
    loglik = float(sum(logp[r, t] for r, t in zip(rows, ids, strict=True)))
    greedy = all(int(np.argmax(logp[r])) == t for r, t in zip(rows, ids, strict=True))
    return loglik, greedy


def _write_tasks(root, docs, name: str, body: str):
    tasks = root / f"tasks_{name}"
    tasks.mkdir(exist_ok=True)
    data = tasks / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "utils.py").write_text(TASK_UTILS)
    (tasks / f"{name}.yaml").write_text(_task_yaml(name, str(data), body))
    return tasks


def _evaluate(lm, tasks_dir, name):
    out = evaluator.simple_evaluate(
        model=lm,
        tasks=[name],
        task_manager=TaskManager(include_path=str(tasks_dir)),
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return out["results"][name], samples


def test_the_entry_point_registers_gazejax():
    assert get_model("gazejax") is GazeJaxLMM


def test_multiple_choice_logliks_equal_a_direct_forward(local):
    root, workdir, docs = local
    labels = [0, 1, 2, 1]
    tasks = _write_tasks(
        root, [{**d, "label": y} for d, y in zip(docs, labels, strict=True)], "gj_mc", MC_BODY
    )
    lm = GazeJaxLMM(workdir=str(workdir), attention="dense", batch_size=5)  # ragged batches
    results, samples = _evaluate(lm, tasks, "gj_mc")
    correct = []
    for doc, sample in zip(docs, samples, strict=True):
        got = [r[0] for r in sample["resps"]]
        want = [_reference_loglik(lm.checkpoint, "dense", None, doc, o) for o in OPTIONS]
        # score=nll (the default): lmms-eval's multiple_choice takes the argmin.
        assert_close_accumulated([-g[0] for g in got], [w[0] for w in want])
        assert [g[1] for g in got] == [w[1] for w in want]
        correct.append(int(np.argmax([w[0] for w in want])) == sample["target"])
    assert results["acc,none"] == pytest.approx(np.mean(correct))


def test_gaze_with_every_region_equals_dense_and_one_region_does_not(local):
    root, workdir, docs = local
    tasks = _write_tasks(root, [{**d, "label": 0} for d in docs], "gj_mc_gaze", MC_BODY)
    logliks = {}
    for name, kwargs in {
        "dense": dict(attention="dense"),
        "all": dict(attention="gaze", budget=1.0),
        "one": dict(attention="gaze", top_k=1),
    }.items():
        lm = GazeJaxLMM(workdir=str(workdir), batch_size=4, **kwargs)
        _, samples = _evaluate(lm, tasks, "gj_mc_gaze")
        logliks[name] = np.asarray([r[0][0] for s in samples for r in s["resps"]])
    assert_close_accumulated(logliks["all"], logliks["dense"])
    assert np.abs(logliks["one"] - logliks["dense"]).max() > 1e-3
    want = [_reference_loglik(lm.checkpoint, "gaze", 1, d, o)[0] for d in docs for o in OPTIONS]
    assert_close_accumulated(-logliks["one"], want)


def test_generate_until_equals_no_cache_greedy_decoding(local):
    root, workdir, docs = local
    lm = GazeJaxLMM(workdir=str(workdir), attention="gaze", top_k=1)
    checkpoint, eos = lm.checkpoint, lm.checkpoint.tokenizer.token_to_id(IM_END_TOKEN)
    expected = []
    for doc in docs:
        prompt = inference.build_prompt(
            lm.config, checkpoint.tokenizer, doc["question"], _visuals(checkpoint, doc), ""
        )
        tokens, _ = greedy_reference(lm.model, checkpoint.params, prompt, MAX_NEW_TOKENS, 1)
        tokens = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
        expected.append(checkpoint.tokenizer.decode(tokens, skip_special_tokens=True))
    # lmms-eval strips predictions before matching, not references
    answers = [e.strip() if i % 2 == 0 else "zzz" for i, e in enumerate(expected)]
    tasks = _write_tasks(
        root, [{**d, "answer": a} for d, a in zip(docs, answers, strict=True)], "gj_gen", GEN_BODY
    )
    results, samples = _evaluate(lm, tasks, "gj_gen")
    assert [s["resps"][0][0] for s in samples] == expected
    assert results["exact_match,none"] == pytest.approx(0.5)


def test_loglikelihood_pairs_survive_lmms_evals_output_unwrapping(local):
    """lmms-eval 0.7 turns a bare ``(float, bool)`` output into its str; ours come back whole."""
    _, workdir, docs = local
    lm = GazeJaxLMM(workdir=str(workdir), attention="dense", score="loglik")
    lm.task_dict = {"t": {"test": docs}}

    def visual(doc):
        return [doc["image"]]  # an image path this time

    args = ("what?", " red", visual, 0, "t", "test")
    metadata = {"task": "t", "doc_id": 0, "repeats": 1}
    request = Instance("loglikelihood", args, idx=0, metadata=metadata)
    pair, _ = unwrap_generation_output(lm.loglikelihood([request])[0])
    assert isinstance(pair, tuple) and len(pair) == 2
    want = _reference_loglik(lm.checkpoint, "dense", None, {**docs[0], "question": "what?"}, "red")
    assert_close_accumulated(pair[0], want[0])
    assert pair[1] == want[1]


def test_cut_at_stops_at_the_first_stop_string():
    assert cut_at("red square. blue", [".", "blue"]) == "red square"
    assert cut_at("red", ["", "x"]) == "red"


def test_bad_model_args_are_refused(local, tmp_path):
    _, workdir, _ = local
    with pytest.raises(TypeError, match="unknown model_args"):
        GazeJaxLMM(workdir=str(workdir), temprature=1.0)
    with pytest.raises(ValueError, match="need attention=gaze"):
        GazeJaxLMM(workdir=str(workdir), attention="dense", top_k=2)
    with pytest.raises(ValueError, match="not both"):
        GazeJaxLMM(workdir=str(workdir), top_k=2, budget=0.5)
    with pytest.raises(ValueError, match="budget"):
        GazeJaxLMM(workdir=str(workdir), budget=1.5)
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        GazeJaxLMM(workdir=str(workdir), attention="gaze", top_k=0)
    with pytest.raises(ValueError, match="max_frames must be >= 1, got 0"):
        GazeJaxLMM(workdir=str(workdir), max_frames=0)
    with pytest.raises(ValueError, match="score"):
        GazeJaxLMM(workdir=str(workdir), score="loss")
    with pytest.raises(ValueError, match="batch_size"):
        GazeJaxLMM(workdir=str(workdir), batch_size="auto")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GazeJaxLMM(workdir=str(tmp_path))


def test_lmms_eval_cli_runs_the_plugin(local, tmp_path):
    """``python -m lmms_eval --model gazejax`` end to end, as a user runs it."""
    root, workdir, docs = local
    tasks = _write_tasks(root, [{**d, "label": 2} for d in docs], "gj_mc_cli", MC_BODY)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "gazejax",
        "--model_args",
        f"workdir={workdir},attention=gaze,budget=0.5",
        "--tasks",
        "gj_mc_cli",
        "--include_path",
        str(tasks),
        "--batch_size",
        "2",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (path,) = glob.glob(str(out / "**" / "*results.json"), recursive=True)
    with open(path) as f:
        acc = json.load(f)["results"]["gj_mc_cli"]["acc,none"]
    lm = GazeJaxLMM(workdir=str(workdir))
    k = {1: 2, 2: 4}  # budget 0.5 of 4 regions (an image) or 8 (the 2-frame video)
    correct = []
    for doc in docs:
        top_k = k[2 if doc["video"] else 1]
        logliks = [_reference_loglik(lm.checkpoint, "gaze", top_k, doc, o)[0] for o in OPTIONS]
        correct.append(int(np.argmax(logliks)) == 2)
    assert acc == pytest.approx(np.mean(correct))

r"""Evaluate a trained workdir: a jitted sweep over methods × KV budgets × benchmarks.

    python -m gazejax.evaluate --workdir runs/gaze \
        [--methods dense,gaze,dense_reduced,evict_question] [--budgets 0.11,0.22,0.44] \
        [--examples 288] [--benchmarks synthetic,jsonl:PATH[:NAME]] [--batch-size 16] \
        [--image-root DIR] [--video-root DIR] [--max-frames 8] [--fps 1] [--jsonl-limit N] \
        [--out runs/gaze/eval]

writes ``OUT/results.json`` (DESIGN.md §6: one record per method, budget and benchmark),
``OUT/results.md`` (a table) and ``OUT/score_vs_kv.png`` (score against visual KV fraction).

**Budget.** A budget ``f`` is the fraction of a sample's visual KV entries that one answer query
may read (0.22: 22 % of the 36 visual tokens of an image, or of the 144 of a 4-frame video).
Context tokens (``|C|`` per unit, gaze checkpoints only) are read by every method and reported
separately (``context_kv``); ``kv_size`` = visual + context entries, as in the paper's sec. 3.5.

**Scoring** is the same for every method: one teacher-forced forward of the whole conversation,
and an answer counts when the argmax of every answer token (and of the closing ``<|im_end|>``)
is right (:func:`gazejax.train.answer_exact_match`). Each (method, budget, bucket shape)
compiles once. The *answer queries* are the slots that carry a target: the last prompt token
(``assistant\n``, which predicts the first answer token) and the answer tokens.

**Methods** (all with the checkpoint's weights):

- ``dense``: dense attention; every answer query reads every visual token (``f = 1``).
- ``gaze@f``: gaze attention at ``K = max(1, round(f·R))`` regions, ``R`` the regions of a sample
  of the batch's bucket (9 for a 6×6 image in 2×2 regions, 36 for a 4-frame video); the visual
  entries read are ``≤ K·m``. Every text query routes (the question's too), as in training. A
  checkpoint trained dense has no context tokens; gaze then runs without them (noted).
- ``dense_reduced@f``: the projector's ``h×w`` tokens of every unit are average-pooled over
  ``s_h×s_w`` windows (ragged edge windows average what they hold) before the LLM, the window
  chosen so that the kept fraction ``⌈h/s_h⌉·⌈w/s_w⌉ / (h·w)`` is closest to ``f`` (6×6: 2×2 →
  25 %, 3×3 → 11 %, 1×2 → 50 %); the sequence is laid out for the pooled grid; dense attention.
- ``evict_question@f`` (InfiniPot-V / HERMES-style, query-guided eviction): the *prefill* is
  every slot before the first answer query; at its end each layer scores the visual entries by
  the dense attention weight the question's queries give them (text slots after the first visual
  token and before the first answer query, i.e. the question and the template up to
  ``assistant``), averaged over those queries and all heads; per layer and sample it keeps the
  ``max(1, round(f·n))`` best of its ``n`` visual entries (shared by the heads). Answer queries
  then attend densely to all text and context entries and the kept visual entries only; prefill
  queries are unchanged (dense). Implemented exactly with two forwards: a dense one capturing
  queries and keys, then one with a per-layer mask.
- ``token_compression``: the checkpoint's 3×3 stride-2 projector convolution, evaluated dense;
  only when ``model.projector.compress`` is set (else skipped with a note); its budget is fixed
  by the convolution (relative to the uncompressed grid).

Benchmark ``synthetic``: the synthetic set's eval split (the workdir's data settings and seed),
``ceil(N / tasks)`` examples per enabled task, scored per task, per family (single_region,
multi_region, counting, video) and overall (the mean over examples). The prompt is the training
template (ChatML with the workdir's system prompt), logged in ``results.json``.

Benchmark ``jsonl:PATH[:NAME]`` (NAME: default the file's stem): a generic JSONL file, one
question a line: ``{"question": str, "image": str | [str] (optional), "video": str (a file or a
folder of frames, optional), "options": [str] (optional), "answer": str, "id": optional}``.
Images are read relative to ``--image-root`` (default: the file's folder), videos relative to
``--video-root`` (default: the image root), sampled as in training (``--max-frames``, default
the workdir's, at ``--fps``). The prompt is the training template with the question as the user
turn, after one ``<image>\n`` per image (one for the video) unless the question has its own
placeholders; logged in ``results.json``. Every method scores it the same way, from the same
teacher-forced forward as above:

- multiple choice (``options`` present), metric ``option_loglik_accuracy``: one sequence per
  option, the option's text as the whole assistant answer (options are not listed in the
  prompt); an option's score is the summed log-probability of its tokens and the closing
  ``<|im_end|>`` (so a prefix of another option is not favoured); correct when the best option
  (the first on ties) is the answer, given as an option's text or its letter (``B``, ``B.``,
  ``(B)``). Option rows are packed like any sequence: one compilation per bucket shape,
  whatever the number of options.
- open-ended (no options), metric ``exact_match``: the teacher-forced exact match above
  (every answer token and ``<|im_end|>`` the argmax), not free generation.

A file with both kinds gives two records per method (one per metric); each record carries
``per_example`` (id, line, correct; for multiple choice the chosen letter and every option's
log-likelihood) and ``by_family`` by visual kind (image, video, text, ``Nimages``). A bad line
raises :class:`~gazejax.data.records.DataError` naming the file and line before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gazejax.cost import regions_per_unit
from gazejax.data.batches import synthetic_examples
from gazejax.data.images import read_image
from gazejax.data.packing import Text, Visual, pack_batch
from gazejax.data.pipeline import example_items
from gazejax.data.records import DataError, Location, parse_visual_paths
from gazejax.data.synthetic import TASKS
from gazejax.data.template import DEFAULT_SYSTEM_PROMPT
from gazejax.data.video import read_video
from gazejax.data.vocab import IMAGE_TOKEN, UNK_TOKEN, VIDEO_TOKEN
from gazejax.gaze.inputs import MultimodalInputs
from gazejax.gaze.regions import validate_region_size
from gazejax.generate import Checkpoint, load_checkpoint, with_attention
from gazejax.models.attention import apply_rope, rope_cos_sin
from gazejax.models.decoder import Attention, dense_visibility
from gazejax.models.mllm import MultimodalConfig, MultimodalModel
from gazejax.train import answer_exact_match
from kernels.gaze_attention import TokenKind

BUDGET_METHODS = ("gaze", "dense_reduced", "evict_question")
METHODS = ("dense", *BUDGET_METHODS, "token_compression")
FAMILIES = ("single_region", "multi_region", "counting", "video")
BENCHMARKS = ("synthetic", "jsonl:PATH[:NAME]")
DEFAULT_BUDGETS = (0.11, 0.22, 0.44)
COLORS = {
    "dense": (0, 0, 0),
    "gaze": (214, 39, 40),
    "dense_reduced": (31, 119, 180),
    "evict_question": (44, 160, 44),
    "token_compression": (148, 103, 189),
}


# --- Methods -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """A method, and its budget (fraction of a sample's visual KV entries; None: its own)."""

    name: str
    budget: float | None = None

    @property
    def label(self) -> str:
        return self.name if self.budget is None else f"{self.name}@{self.budget:g}"


def parse_methods(methods: Sequence[str], budgets: Sequence[float]) -> list[Method]:
    """``dense`` once, each budgeted method at every budget, ``token_compression`` once."""
    out = []
    for name in methods:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
        if name in BUDGET_METHODS:
            out.extend(Method(name, float(b)) for b in budgets)
        else:
            out.append(Method(name))
    for b in budgets:
        if not 0 < b <= 1:
            raise ValueError(f"budgets are fractions in (0, 1], got {b}")
    return out


def _round(x: float) -> int:
    return math.floor(x + 0.5)


def gaze_top_k(budget: float, num_regions: int) -> int:
    """K for a budget over ``num_regions`` regions: ``max(1, round(f·R))``, at most ``R``."""
    return min(max(1, _round(budget * num_regions)), max(num_regions, 1))


def pool_window(grid: tuple[int, int], budget: float) -> tuple[int, int]:
    """The ``(s_h, s_w)`` window whose kept fraction ``⌈h/s_h⌉·⌈w/s_w⌉/(h·w)`` is closest to
    ``budget`` (ties: not above the budget, then the squarest window)."""
    h, w = grid

    def key(window):
        kept = math.ceil(h / window[0]) * math.ceil(w / window[1]) / (h * w)
        return (round(abs(kept - budget), 9), kept > budget, abs(window[0] - window[1]), window)

    return min(((a, b) for a in range(1, h + 1) for b in range(1, w + 1)), key=key)


@dataclasses.dataclass(frozen=True)
class PooledConfig(MultimodalConfig):
    """A :class:`MultimodalConfig` whose units enter the LLM average-pooled over ``pool``
    windows: ``unit_grid`` is the pooled grid (so packing lays out the smaller grid)."""

    pool: tuple[int, int] = (1, 1)

    @property
    def projector_grid(self) -> tuple[int, int]:
        return self.projector.output_grid((self.vit.grid, self.vit.grid))

    @property
    def unit_grid(self) -> tuple[int, int]:
        h, w = self.projector_grid
        return math.ceil(h / self.pool[0]), math.ceil(w / self.pool[1])


def pooled_config(config: MultimodalConfig, pool: tuple[int, int]) -> PooledConfig:
    """``config`` (dense) with pooled units; region sizes capped at the pooled grid."""
    h, w = config.projector.output_grid((config.vit.grid, config.vit.grid))
    ph, pw = math.ceil(h / pool[0]), math.ceil(w / pool[1])
    region = (min(config.region_size[0], ph), min(config.region_size[1], pw))
    return PooledConfig(
        vit=config.vit,
        projector=config.projector,
        decoder=dataclasses.replace(config.decoder, attention="dense"),
        num_context_tokens=config.num_context_tokens,
        region_size=region + tuple(config.region_size[2:]),
        pool=tuple(pool),
    )


def pool_tokens(tokens: jax.Array, grid: tuple[int, int], pool: tuple[int, int]) -> jax.Array:
    """Average-pools ``[n, h*w, d]`` raster tokens over ``pool`` windows -> ``[n, h'*w', d]``
    (edge windows average the tokens they hold)."""
    n, _, d = tokens.shape
    (h, w), (sh, sw) = grid, pool
    gh, gw = math.ceil(h / sh), math.ceil(w / sw)
    pad = ((0, 0), (0, gh * sh - h), (0, gw * sw - w), (0, 0))
    x = jnp.pad(tokens.reshape(n, h, w, d).astype(jnp.float32), pad)
    counts = jnp.pad(jnp.ones((1, h, w, 1), jnp.float32), pad)
    total = x.reshape(n, gh, sh, gw, sw, d).sum((2, 4))
    count = counts.reshape(1, gh, sh, gw, sw, 1).sum((2, 4))
    return (total / count).reshape(n, gh * gw, d).astype(tokens.dtype)


class PooledModel(MultimodalModel):
    """:class:`MultimodalModel` (same parameters) whose visual tokens are pooled after the
    projector (``config`` is a :class:`PooledConfig`)."""

    def encode_units(self, units: jax.Array) -> jax.Array:
        cfg = self.config
        batch, max_units = units.shape[:2]
        features = self.vision(units.reshape(batch * max_units, *units.shape[2:]))
        grid = (cfg.vit.grid, cfg.vit.grid)
        tokens = self.projector(features, grid=grid)
        tokens = pool_tokens(tokens, cfg.projector_grid, cfg.pool)
        return tokens.reshape(batch, max_units * tokens.shape[1], tokens.shape[2])


# --- evict_question ----------------------------------------------------------------------------


def _layer_index(module: nn.Module) -> int:
    path = module.scope.path
    return int(next(p for p in path if p.startswith("layers_")).split("_")[1])


def evict_masks(
    model: MultimodalModel, params, inputs: MultimodalInputs, targets: jax.Array, budget: float
) -> tuple[jax.Array, jax.Array]:
    """Per-layer dense masks after question-guided eviction (see the module docstring).

    Returns:
      bool ``[num_layers, batch, length, length]`` masks, and bool ``[num_layers, batch,
      length]``: the visual entries kept per layer.
    """
    cfg = model.config.decoder
    names = ("q_norm", "k_norm") if cfg.qk_norm else ("q_proj", "k_proj")
    _, state = model.apply(
        {"params": params},
        inputs,
        capture_intermediates=lambda mdl, method: method == "__call__" and mdl.name in names,
        mutable=["intermediates"],
    )
    meta = inputs.meta
    base = dense_visibility(meta, meta)  # [b, q, kv]
    big = jnp.iinfo(jnp.int32).max
    visual = meta.kind == TokenKind.VISUAL
    decode = (targets >= 0) & (meta.position >= 0)
    first_decode = jnp.min(jnp.where(decode, meta.position, big), axis=-1, keepdims=True)
    first_visual = jnp.min(jnp.where(visual, meta.position, big), axis=-1, keepdims=True)
    scorer = (
        (meta.kind == TokenKind.TEXT)
        & (meta.position > first_visual)
        & (meta.position < first_decode)
    )
    num_visual = visual.sum(-1)
    keep_n = jnp.clip(jnp.floor(budget * num_visual + 0.5), 1, num_visual)[:, None]
    cos, sin = rope_cos_sin(jnp.maximum(meta.position, 0), cfg.head_dim, cfg.rope_theta)
    group = cfg.num_heads // cfg.num_kv_heads
    layers = state["intermediates"]["decoder"]
    masks, kept = [], []
    for layer in range(cfg.num_layers):
        attn = layers[f"layers_{layer}"]["self_attn"]
        q = apply_rope(attn[names[0]]["__call__"][0], cos, sin).astype(jnp.float32)
        k = apply_rope(attn[names[1]]["__call__"][0], cos, sin).astype(jnp.float32)
        k = jnp.repeat(k, group, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * cfg.head_dim**-0.5
        scores = jnp.where(base[:, None], scores, -jnp.inf)
        row_max = jnp.max(scores, axis=-1, keepdims=True)
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        weights = jnp.where(base[:, None], jnp.exp(scores - row_max), 0.0)
        probs = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-30)
        rows = scorer[:, None, :, None].astype(jnp.float32)  # [b, 1, q, 1]
        weight = (probs * rows).sum((1, 2)) / jnp.maximum(rows.sum((1, 2)) * cfg.num_heads, 1)
        score = jnp.where(visual, weight, -jnp.inf)
        rank = jnp.argsort(jnp.argsort(-score, axis=-1, stable=True), axis=-1, stable=True)
        keep = visual & (rank < keep_n)
        dropped = decode[:, :, None] & (visual & ~keep)[:, None, :]
        masks.append(base & ~dropped)
        kept.append(keep)
    return jnp.stack(masks), jnp.stack(kept)


def evict_logits(
    model: MultimodalModel, params, inputs: MultimodalInputs, targets: jax.Array, budget: float
) -> jax.Array:
    """Teacher-forced logits of ``evict_question@budget`` (``model`` dense)."""
    masks, _ = evict_masks(model, params, inputs, targets, budget)

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, Attention):
            x, attention_inputs, layer_cache = args
            masked = attention_inputs.replace(mask=masks[_layer_index(context.module)])
            return next_fun(x, masked, layer_cache, **kwargs)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        return model.apply({"params": params}, inputs)


# --- Runners -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Runner:
    """How one method packs and scores a batch.

    Attributes:
      method: the method.
      config: the packing and model config.
      logits: ``(params, inputs, targets, top_k) -> logits`` (``top_k`` static; gaze only).
      pool: dense_reduced's window.
    """

    method: Method
    config: MultimodalConfig
    logits: Callable
    pool: tuple[int, int] | None = None


def make_runner(base: MultimodalConfig, method: Method) -> Runner:
    """The :class:`Runner` of ``method`` on a checkpoint of config ``base``."""
    name, budget = method.name, method.budget
    if name in ("dense", "token_compression", "evict_question"):
        config = with_attention(base, "dense")
        model = MultimodalModel(config)
        if name == "evict_question":

            def logits(params, inputs, targets, top_k):
                del top_k
                return evict_logits(model, params, inputs, targets, budget)

            return Runner(method, config, logits)
        return Runner(method, config, _plain_logits(model))
    if name == "gaze":
        config = with_attention(base, "gaze")
        return Runner(method, config, _plain_logits(MultimodalModel(config)))
    if name == "dense_reduced":
        pool = pool_window(base.unit_grid, budget)
        config = pooled_config(base, pool)
        return Runner(method, config, _plain_logits(PooledModel(config)), pool)
    raise ValueError(f"unknown method {name!r}")


def _plain_logits(model: MultimodalModel) -> Callable:
    def logits(params, inputs, targets, top_k):
        del targets
        return model.apply({"params": params}, inputs, top_k=top_k)

    return logits


def answer_loglik(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """float32 ``[batch]``: the summed log-probability of the supervised tokens (the targets)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(targets >= 0, picked, 0.0).sum(-1)


def _jitted(runner: Runner) -> Callable:
    def score(params, inputs, targets, top_k):
        logits = runner.logits(params, inputs, targets, top_k)
        return answer_exact_match(logits, targets), answer_loglik(logits, targets)

    return jax.jit(score, static_argnums=(3,))


# --- Benchmarks --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
    """One scored sequence. A multiple-choice question is one Example per option (``group``:
    the question's index in its benchmark, ``option``: the option's; -1 when not a choice)."""

    items: list
    task: str
    family: str
    bucket: str
    group: int = -1
    option: int = -1


def _tuples(config: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def synthetic_benchmark(raw_config: dict, tokenizer, examples: int) -> tuple[list[Example], dict]:
    """``ceil(examples / tasks)`` eval-split examples of every enabled synthetic task."""
    data = raw_config.get("data", {})
    synthetic = _tuples(dict(data.get("synthetic", {})))
    weights = synthetic.pop("tasks", None) or dict.fromkeys(TASKS, 1.0)
    tasks = [t for t in TASKS if weights.get(t, 0) > 0]
    per_task = math.ceil(examples / len(tasks))
    seed = int(raw_config.get("seed", 0))
    system_prompt = data.get("system_prompt", DEFAULT_SYSTEM_PROMPT)
    out = []
    for task in tasks:
        make = synthetic_examples(
            {**synthetic, "tasks": {task: 1.0}}, "eval", seed, tokenizer, system_prompt
        )
        for index in range(per_task):
            items, info = make(index)
            family = info["family"]
            out.append(Example(items, task, family, "video" if family == "video" else "image"))
    info = {
        "split": "eval",
        "seed": seed,
        "tasks": {t: TASKS[t][0] for t in tasks},
        "examples_per_task": per_task,
        "system_prompt": system_prompt,
        "template": "ChatML (the training template); answers scored teacher-forced",
    }
    return out, info


# --- Generic JSONL benchmarks ------------------------------------------------------------------

JSONL_KEYS = ("question", "image", "video", "options", "answer", "id")
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
JSONL_PROMPT = (
    "ChatML (the training template, the checkpoint's system prompt); the user turn is the "
    "question as written, after one '<image>\\n' per image (or one for the video) unless it "
    "has its own <image>/<video> placeholders; the assistant turn is the scored answer"
)
JSONL_SCORING = {
    "option_loglik_accuracy": (
        "multiple choice (options present): one teacher-forced forward per option, the option's "
        "text as the whole assistant answer; its score is the summed log-probability of the "
        "option's tokens and the closing <|im_end|>; correct when the highest-scoring option "
        "(first on ties) is the answer (the answer is an option's text or its letter A, B, ...). "
        "Options are not listed in the prompt."
    ),
    "exact_match": (
        "open-ended (no options): teacher-forced argmax of every answer token and the closing "
        "<|im_end|> (as the synthetic benchmark); not free generation"
    ),
}


@dataclasses.dataclass(frozen=True)
class JsonlSpec:
    """A ``jsonl:PATH[:NAME]`` benchmark (NAME: default the file's stem)."""

    path: str
    name: str

    @classmethod
    def parse(cls, text: str) -> JsonlSpec:
        if not text.startswith("jsonl:") or len(text) == len("jsonl:"):
            raise ValueError(f"a JSONL benchmark is jsonl:PATH[:NAME], got {text!r}")
        rest = text[len("jsonl:") :]
        head, sep, name = rest.rpartition(":")
        if sep and name and "/" not in name and head.endswith((".jsonl", ".json")):
            return cls(head, name)
        return cls(rest, pathlib.Path(rest).stem)


@dataclasses.dataclass(frozen=True)
class JsonlQuestion:
    """A validated line: its location, id, question, visual paths, options and answer (the
    option index for multiple choice, else the text)."""

    location: Location
    id: str
    question: str
    images: tuple[str, ...]
    video: str | None
    options: tuple[str, ...] | None
    answer: str | int


def parse_jsonl_line(value, where: Location) -> JsonlQuestion:
    """Validates one decoded line of a JSONL benchmark (see :func:`jsonl_benchmark`).

    Raises:
      DataError: at ``where`` (file and line), saying what is wrong.
    """
    error = where.error
    if not isinstance(value, dict):
        raise error(f"a line is a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(JSONL_KEYS))
    if unknown:
        raise error(f"unknown key(s) {unknown}; known: {', '.join(JSONL_KEYS)}")
    question = value.get("question")
    if not isinstance(question, str) or not question.strip():
        raise error(f"'question' is not a non-empty string: {question!r}")
    answer = value.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise error(f"'answer' is not a non-empty string: {answer!r}")
    images, video = parse_visual_paths(value, where)
    visuals = 1 if video is not None else len(images)
    placeholders = question.count(IMAGE_TOKEN) + question.count(VIDEO_TOKEN)
    if placeholders and placeholders != visuals:
        raise error(
            f"{placeholders} {IMAGE_TOKEN}/{VIDEO_TOKEN} placeholder(s) in the question for "
            f"{visuals} image(s)/video(s)",
            "placeholder",
        )
    options = value.get("options")
    if options is not None:
        if (
            not isinstance(options, list)
            or not all(isinstance(o, str) and o.strip() for o in options)
            or not 2 <= len(options) <= len(OPTION_LETTERS)
        ):
            raise error(f"'options' is not a list of 2 to 26 non-empty strings: {options!r}")
        stripped = [o.strip() for o in options]
        if len(set(stripped)) != len(stripped):
            raise error(f"duplicate options: {options!r}")
        letter = re.fullmatch(r"\(?([A-Za-z])[.)]?", answer.strip())
        if answer.strip() in stripped:
            answer = stripped.index(answer.strip())
        elif letter and OPTION_LETTERS.index(letter[1].upper()) < len(options):
            answer = OPTION_LETTERS.index(letter[1].upper())
        else:
            raise error(
                f"answer {answer!r} is neither an option's text nor a letter "
                f"A-{OPTION_LETTERS[len(options) - 1]}"
            )
        options = tuple(options)
    return JsonlQuestion(
        location=where,
        id=str(value.get("id", f"{pathlib.Path(where.path).name}:{where.line}")),
        question=question,
        images=tuple(images),
        video=video,
        options=options,
        answer=answer,
    )


def read_jsonl_questions(path: str | pathlib.Path, limit: int | None = None) -> list:
    """The validated lines of a JSONL benchmark (blank lines skipped; the first ``limit``).

    Raises:
      DataError: the file is unreadable, or a line is malformed (naming the file and line).
    """
    path = pathlib.Path(path)
    if path.suffix != ".jsonl":
        raise DataError("a JSONL benchmark is a .jsonl file", path, kind="file")
    out = []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                if limit is not None and len(out) >= limit:
                    break
                where = Location(str(path), line=number)
                try:
                    value = json.loads(raw)
                except (ValueError, RecursionError) as exc:
                    raise where.error(f"malformed JSON: {exc}", "json") from exc
                out.append(parse_jsonl_line(value, where))
    except OSError as exc:
        raise DataError(f"cannot read: {exc}", path, kind="file") from exc
    if not out:
        raise DataError("no questions in the file", path, kind="file")
    return out


def jsonl_benchmark(
    spec: JsonlSpec,
    checkpoint: Checkpoint,
    image_root: str | None = None,
    video_root: str | None = None,
    max_frames: int | None = None,
    fps: float = 1.0,
    limit: int | None = None,
) -> tuple[list[Example], list[JsonlQuestion], dict]:
    """A generic JSONL benchmark: one Example per open-ended question, one per option of a
    multiple-choice question (see ``JSONL_PROMPT`` and ``JSONL_SCORING``).

    Each line: ``{"question": str, "image": str | [str] (optional), "video": str (a file or a
    folder of frames, optional), "options": [str] (optional), "answer": str, "id": optional}``.
    Image paths are relative to ``image_root`` (default: the file's folder), videos to
    ``video_root`` (default: ``image_root``); absolute paths are used as they are.

    Raises:
      DataError: a bad line, or a missing / unreadable image or video (naming the line).
    """
    questions = read_jsonl_questions(spec.path, limit)
    image_root = pathlib.Path(image_root or pathlib.Path(spec.path).parent)
    video_root = pathlib.Path(video_root) if video_root else image_root
    max_frames = int(max_frames or checkpoint.max_frames)
    image_size = checkpoint.config.vit.image_size
    tokenizer, system_prompt = checkpoint.tokenizer, checkpoint.system_prompt
    unk = tokenizer.token_to_id(UNK_TOKEN)
    out, unknown = [], 0
    for index, q in enumerate(questions):
        try:
            if q.video is not None:
                frames, _ = read_video(
                    video_root / q.video, image_size=image_size, max_frames=max_frames, fps=fps
                )
                visuals = [frames]
            else:
                visuals = [read_image(image_root / p, image_size)[None] for p in q.images]
        except DataError as error:  # name the line that asked for the image or video
            raise q.location.error(f"id {q.id!r}: {error}", error.kind) from error
        question = q.question.replace(VIDEO_TOKEN, IMAGE_TOKEN)
        if IMAGE_TOKEN not in question:
            question = f"{IMAGE_TOKEN}\n" * len(visuals) + question
        answers = [q.answer] if q.options is None else list(q.options)
        if q.video is not None:
            bucket = "video"
        else:
            bucket = (
                ("text", "image")[len(visuals)] if len(visuals) < 2 else f"{len(visuals)}images"
            )
        task = "open_ended" if q.options is None else "multiple_choice"
        has_unknown = False
        for option, answer in enumerate(answers):
            conversation = [
                {"from": "human", "value": question},
                {"from": "gpt", "value": answer},
            ]
            items = example_items(conversation, visuals, tokenizer, IMAGE_TOKEN, system_prompt)
            has_unknown |= any(
                unk is not None and (x.ids == unk).any() for x in items if isinstance(x, Text)
            )
            option = -1 if q.options is None else option
            out.append(Example(items, task, bucket, bucket, index, option))
        unknown += has_unknown
    info = {
        "path": os.path.abspath(spec.path),
        "image_root": os.path.abspath(image_root),
        "video_root": os.path.abspath(video_root),
        "max_frames": max_frames,
        "fps": fps,
        "questions": len(questions),
        "multiple_choice": sum(q.options is not None for q in questions),
        "open_ended": sum(q.options is None for q in questions),
        "system_prompt": system_prompt,
        "template": JSONL_PROMPT,
        "scoring": {
            k: v
            for k, v in JSONL_SCORING.items()
            if any((q.options is not None) == (k == "option_loglik_accuracy") for q in questions)
        },
        "questions_with_unknown_tokens": unknown,
    }
    return out, questions, info


def jsonl_records(
    runner: Runner, results: dict, benchmark: str, questions: Sequence[JsonlQuestion]
) -> list[dict]:
    """The results.json records of a JSONL benchmark: one per metric present
    (``option_loglik_accuracy`` over the multiple-choice questions, ``exact_match`` over the
    open-ended ones), each with ``per_example`` (id, line, correct; choice and option
    log-likelihoods for multiple choice)."""
    rows: dict[int, list[int]] = {}
    for row, group in enumerate(results["group"]):
        rows.setdefault(group, []).append(row)
    out = []
    for metric in ("option_loglik_accuracy", "exact_match"):
        choice = metric == "option_loglik_accuracy"
        groups = [g for g in sorted(rows) if (questions[g].options is not None) == choice]
        if not groups:
            continue
        sub = {k: [] for k in ("exact", "task", "family", "visual_kv", "context_kv", "dense_kv")}
        per_example = []
        for g in groups:
            q = questions[g]
            first = rows[g][0]
            entry = {"id": q.id, "line": q.location.line}
            if choice:
                by_option = {results["option"][r]: results["loglik"][r] for r in rows[g]}
                logliks = [by_option[o] for o in range(len(q.options))]
                chosen = int(np.argmax(logliks))
                correct = chosen == q.answer
                entry.update(correct=correct, choice=OPTION_LETTERS[chosen], logliks=logliks)
            else:
                correct = bool(results["exact"][first])
                entry.update(correct=correct, loglik=results["loglik"][first])
            per_example.append(entry)
            sub["exact"].append(correct)
            for key in ("task", "family", "visual_kv", "context_kv", "dense_kv"):
                sub[key].append(results[key][first])
        sub["seconds"], sub["top_k"] = results["seconds"], results["top_k"]
        r = record(runner, sub, benchmark)
        r["metric"] = metric
        del r["by_task"]
        r["per_example"] = per_example
        out.append(r)
    return out


def _shape(config: MultimodalConfig, examples: Sequence[Example]) -> tuple[int, int, int]:
    """``(length, max_units, num_regions)`` that fit every example (length rounded up to 8)."""
    h, w = config.unit_grid
    length = units = regions = 1
    for example in examples:
        text = sum(len(x.ids) for x in example.items if isinstance(x, Text))
        frames = [len(x.frames) for x in example.items if isinstance(x, Visual)]
        size = validate_region_size(config.region_size, h, w)
        n = sum(frames)
        length = max(length, text + n * (h * w + config.num_context_tokens))
        units = max(units, n)
        regions = max(regions, sum(regions_per_unit((h, w), f, size) for f in frames))
    return math.ceil(length / 8) * 8, units, regions


# --- The sweep ---------------------------------------------------------------------------------


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=sys.stderr, unit="ex", dynamic_ncols=True)

    def update(self, n: int, label: str) -> None:
        if self._bar is not None:
            self._bar.set_description(label, refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run_method(
    checkpoint: Checkpoint,
    runner: Runner,
    examples: Sequence[Example],
    batch_size: int,
    pad_id: int,
    progress: _Progress | None = None,
    packed: dict | None = None,
) -> dict:
    """Scores ``examples`` with ``runner``; per-example arrays and the gaze K per bucket."""
    method, config = runner.method, runner.config
    score = _jitted(runner)
    h, w = config.unit_grid
    full = config.projector.output_grid((config.vit.grid, config.vit.grid))
    if method.name == "token_compression":
        full = (config.vit.grid, config.vit.grid)
    capacity = math.prod(config.region_size)
    packed = {} if packed is None else packed
    keys = ("exact", "loglik", "group", "option", "task", "family")
    results = {k: [] for k in (*keys, "visual_kv", "context_kv", "dense_kv")}
    top_ks = {}
    start = time.monotonic()
    for bucket in sorted({e.bucket for e in examples}):
        chosen = [e for e in examples if e.bucket == bucket]
        shape = _shape(config, chosen)
        top_k = None
        if method.name == "gaze":
            top_k = top_ks[bucket] = gaze_top_k(method.budget, shape[2])
        for first in range(0, len(chosen), batch_size):
            batch = chosen[first : first + batch_size]
            padded = batch + [batch[-1]] * (batch_size - len(batch))
            key = (config.unit_grid, tuple(config.region_size), config.num_context_tokens)
            key = (*key, bucket, first)
            if key not in packed:
                packed[key] = pack_batch([e.items for e in padded], config.geometry, *shape, pad_id)
            inputs, targets = packed[key]
            exact, loglik = score(checkpoint.params, inputs, targets, top_k)
            exact, loglik = np.asarray(exact)[: len(batch)], np.asarray(loglik)[: len(batch)]
            kind = np.asarray(inputs.meta.kind)[: len(batch)]
            num_visual = (kind == TokenKind.VISUAL).sum(-1)
            num_context = (kind == TokenKind.CONTEXT).sum(-1)
            units = num_visual // (h * w)
            dense_kv = units * full[0] * full[1]
            if method.name == "gaze":
                visual_kv = np.minimum(top_k * capacity, num_visual)
            elif method.name == "evict_question":
                visual_kv = np.clip(np.floor(method.budget * num_visual + 0.5), 1, num_visual)
            else:
                visual_kv = num_visual
            results["exact"] += exact.astype(bool).tolist()
            results["loglik"] += loglik.astype(float).tolist()
            results["group"] += [e.group for e in batch]
            results["option"] += [e.option for e in batch]
            results["task"] += [e.task for e in batch]
            results["family"] += [e.family for e in batch]
            results["visual_kv"] += visual_kv.astype(float).tolist()
            results["context_kv"] += num_context.astype(float).tolist()
            results["dense_kv"] += dense_kv.astype(float).tolist()
            if progress is not None:
                progress.update(len(batch), method.label)
    results["seconds"] = time.monotonic() - start
    results["top_k"] = top_ks
    return results


def _summary(exact, visual, context, dense) -> dict:
    exact, visual, context, dense = (
        np.asarray(x, np.float64) for x in (exact, visual, context, dense)
    )
    dense_safe = np.maximum(dense, 1.0)
    return {
        "score": float(exact.mean()) if len(exact) else float("nan"),
        "num_examples": int(len(exact)),
        "visual_kv": float(visual.mean()),
        "context_kv": float(context.mean()),
        "kv_size": float((visual + context).mean()),
        "dense_kv_size": float(dense.mean()),
        "visual_kv_fraction": float((visual / dense_safe).mean()),
        "kv_fraction": float(((visual + context) / dense_safe).mean()),
    }


def record(runner: Runner, results: dict, benchmark: str) -> dict:
    """One results.json record (DESIGN.md §6 keys, then the breakdowns)."""
    method = runner.method
    arrays = [np.asarray(results[k]) for k in ("exact", "visual_kv", "context_kv", "dense_kv")]
    overall = _summary(*arrays)
    family = np.asarray(results["family"])
    task = np.asarray(results["task"])
    top_k = results["top_k"]
    if len(set(top_k.values())) == 1:
        top_k = next(iter(top_k.values()))
    out = {
        "method": method.name,
        "budget": method.budget,
        "label": method.label,
        "top_k": top_k or None,
        "kv_size": overall["kv_size"],
        "dense_kv_size": overall["dense_kv_size"],
        "benchmark": benchmark,
        "metric": "exact_match",
        "score": overall["score"],
        "num_examples": overall["num_examples"],
        "kv_fraction": overall["kv_fraction"],
        "visual_kv_fraction": overall["visual_kv_fraction"],
        "visual_kv": overall["visual_kv"],
        "context_kv": overall["context_kv"],
        "seconds": round(results["seconds"], 3),
        "by_family": {
            f: _summary(*(a[family == f] for a in arrays))
            for f in [*FAMILIES, *sorted(set(family) - set(FAMILIES))]
            if (family == f).any()
        },
        "by_task": {
            t: {"score": float(arrays[0][task == t].mean()), "num_examples": int((task == t).sum())}
            for t in dict.fromkeys(task)
        },
    }
    if runner.pool is not None:
        out["pool"] = list(runner.pool)
        out["pooled_grid"] = list(runner.config.unit_grid)
    return out


def sweep(
    checkpoint: Checkpoint,
    raw_config: dict,
    methods: Sequence[Method],
    examples: int,
    benchmarks: Sequence[str] = ("synthetic",),
    batch_size: int | None = None,
    progress: bool = True,
    image_root: str | None = None,
    video_root: str | None = None,
    max_frames: int | None = None,
    fps: float = 1.0,
    jsonl_limit: int | None = None,
) -> dict:
    """Runs every method on every benchmark; the ``results.json`` content.

    ``benchmarks``: ``"synthetic"`` (``examples`` of the synthetic eval split) and
    ``"jsonl:PATH[:NAME]"`` (every line, or the first ``jsonl_limit``; see
    :func:`jsonl_benchmark` for ``image_root``, ``video_root``, ``max_frames`` and ``fps``).
    """
    base = checkpoint.config
    notes = []
    trained = base.decoder.attention
    if any(m.name == "gaze" for m in methods) and base.num_context_tokens == 0:
        notes.append(
            "gaze on a checkpoint without context tokens (num_context_tokens = 0, e.g. trained "
            "dense): gaze runs without them"
        )
    if any(m.name == "dense" for m in methods) and base.num_context_tokens:
        notes.append(
            f"dense keeps the checkpoint's {base.num_context_tokens} context tokens per unit "
            "(text queries read them, as in gaze)"
        )
    if any(m.name == "token_compression" for m in methods) and not base.projector.compress:
        notes.append("token_compression skipped: the checkpoint's projector has no compress conv")
        methods = [m for m in methods if m.name != "token_compression"]
    batch_size = batch_size or int(raw_config.get("batch_size", 8))
    pad_token = raw_config.get("data", {}).get("pad_token", "<|endoftext|>")
    pad_id = checkpoint.tokenizer.token_to_id(pad_token) or 0
    records, bench_info = [], {}
    loaded = []
    for benchmark in benchmarks:  # load (and validate) every benchmark before the long part
        if benchmark == "synthetic":
            chosen, info = synthetic_benchmark(raw_config, checkpoint.tokenizer, examples)
            loaded.append((benchmark, chosen, None, info))
        elif benchmark.startswith("jsonl:"):
            spec = JsonlSpec.parse(benchmark)
            if spec.name in bench_info or spec.name == "synthetic":
                raise ValueError(f"two benchmarks named {spec.name!r}: name one jsonl:PATH:NAME")
            chosen, questions, info = jsonl_benchmark(
                spec, checkpoint, image_root, video_root, max_frames, fps, jsonl_limit
            )
            loaded.append((spec.name, chosen, questions, info))
        else:
            raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
        bench_info[loaded[-1][0]] = loaded[-1][3]
    for benchmark, chosen, questions, _ in loaded:
        bar = _Progress(len(chosen) * len(methods), progress)
        packed: dict = {}
        try:
            for method in methods:
                runner = make_runner(base, method)
                results = run_method(checkpoint, runner, chosen, batch_size, pad_id, bar, packed)
                if questions is None:
                    records.append(record(runner, results, benchmark))
                else:
                    records += jsonl_records(runner, results, benchmark, questions)
        finally:
            bar.close()
    return {
        "checkpoint": {
            "step": checkpoint.step,
            "attention": trained,
            "top_k": base.decoder.gaze_top_k if trained == "gaze" else None,
            "num_context_tokens": base.num_context_tokens,
            "region_size": list(base.region_size),
            "unit_grid": list(base.unit_grid),
            "projector_compress": bool(base.projector.compress),
        },
        "budget": "fraction of a sample's visual KV entries one answer query reads",
        "scoring": (
            "teacher-forced argmax of every answer token (gazejax.train.answer_exact_match); "
            "answer queries = slots with a target"
        ),
        "jsonl_scoring": JSONL_SCORING,
        "benchmarks": bench_info,
        "notes": notes,
        "records": records,
    }


# --- Reports -----------------------------------------------------------------------------------


def markdown_table(results: dict) -> str:
    """Rows method@budget; columns KV %, overall and the families."""
    lines = []
    for benchmark in results["benchmarks"]:
        if benchmark != "synthetic":
            lines += _jsonl_table(results, benchmark)
            continue
        lines += [
            f"### {benchmark} (exact match, %)",
            "",
            "| method | visual KV % | KV % (+ctx) | overall | single-region | multi-region "
            "| counting | video | examples | s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["records"]:
            if r["benchmark"] != benchmark:
                continue
            fams = [
                f"{100 * r['by_family'][f]['score']:.1f}" if f in r["by_family"] else "–"
                for f in FAMILIES
            ]
            lines.append(
                f"| {r['label']} | {100 * r['visual_kv_fraction']:.1f} | "
                f"{100 * r['kv_fraction']:.1f} | {100 * r['score']:.1f} | "
                + " | ".join(fams)
                + f" | {r['num_examples']} | {r['seconds']:.0f} |"
            )
        lines.append("")
    if results["notes"]:
        lines += [*(f"- {n}" for n in results["notes"]), ""]
    return "\n".join(lines)


METRIC_NAMES = {
    "exact_match": "exact match",
    "option_loglik_accuracy": "option log-likelihood accuracy",
}


def _jsonl_table(results: dict, benchmark: str) -> list[str]:
    """A JSONL benchmark's sections: one per metric, columns by visual kind."""
    records = [r for r in results["records"] if r["benchmark"] == benchmark]
    lines = []
    for metric in dict.fromkeys(r["metric"] for r in records):
        chosen = [r for r in records if r["metric"] == metric]
        kinds = list(dict.fromkeys(k for r in chosen for k in r["by_family"]))
        lines += [
            f"### {benchmark} ({METRIC_NAMES.get(metric, metric)}, %)",
            "",
            "| method | visual KV % | KV % (+ctx) | score | "
            + "".join(f"{k} | " for k in kinds)
            + "examples | s |",
            "|---|---:|---:|---:|" + "---:|" * len(kinds) + "---:|---:|",
        ]
        for r in chosen:
            by_kind = [
                f"{100 * r['by_family'][k]['score']:.1f}" if k in r["by_family"] else "–"
                for k in kinds
            ]
            lines.append(
                f"| {r['label']} | {100 * r['visual_kv_fraction']:.1f} | "
                f"{100 * r['kv_fraction']:.1f} | {100 * r['score']:.1f} | "
                + "".join(f"{x} | " for x in by_kind)
                + f"{r['num_examples']} | {r['seconds']:.0f} |"
            )
        lines.append("")
    return lines


def draw_plot(results: dict, path: str, benchmark: str = "synthetic") -> None:
    """Score against visual KV fraction per method: overall, then one panel per family (a
    JSONL benchmark: its first metric)."""
    records = [r for r in results["records"] if r["benchmark"] == benchmark]
    records = [r for r in records if r["metric"] == records[0]["metric"]] if records else []
    families = [*FAMILIES, *dict.fromkeys(f for r in records for f in r["by_family"])]
    families = [f for f in dict.fromkeys(families) if any(f in r["by_family"] for r in records)]
    panels = ["overall", *families]
    pw, ph, margin = 300, 240, 40
    legend_h = 24
    width = len(panels) * (pw + margin) + margin
    image = Image.new("RGB", (width, ph + 2 * margin + legend_h), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for p, panel in enumerate(panels):
        x0, y0 = margin + p * (pw + margin), margin
        draw.rectangle([x0, y0, x0 + pw, y0 + ph], outline=(0, 0, 0))
        draw.text((x0, y0 - 16), panel, fill=(0, 0, 0), font=font)
        for t in (0.0, 0.5, 1.0):
            draw.text((x0 + t * pw - 8, y0 + ph + 4), f"{t:g}", fill=(0, 0, 0), font=font)
            draw.text((x0 - 24, y0 + ph - t * ph - 6), f"{t:g}", fill=(0, 0, 0), font=font)
        by_method: dict[str, list] = {}
        for r in records:
            s = r if panel == "overall" else r["by_family"].get(panel)
            if s is not None:
                by_method.setdefault(r["method"], []).append((s["visual_kv_fraction"], s["score"]))
        # Dense as a dotted reference level; later methods' markers smaller (overlaps show).
        for _, y in by_method.get("dense", [])[:1]:
            level = y0 + ph - min(max(y, 0), 1) * ph
            for x in range(x0, x0 + pw, 6):
                draw.line([(x, level), (x + 2, level)], fill=COLORS["dense"])
        for order, (name, points) in enumerate(by_method.items()):
            xy = [
                (x0 + min(max(x, 0), 1) * pw, y0 + ph - min(max(y, 0), 1) * ph)
                for x, y in sorted(points)
            ]
            color = COLORS.get(name, (127, 127, 127))
            if len(xy) > 1:
                draw.line(xy, fill=color, width=2)
            radius = max(6 - order, 2)
            for x, y in xy:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
    metric = METRIC_NAMES.get(records[0]["metric"], "score") if records else "score"
    draw.text((margin, ph + margin + 18), f"x: visual KV fraction   y: {metric}", fill=(0, 0, 0))
    x = width // 3
    for name in dict.fromkeys(r["method"] for r in records):
        color = COLORS.get(name, (127, 127, 127))
        draw.rectangle([x, ph + margin + 20, x + 10, ph + margin + 30], fill=color)
        draw.text((x + 14, ph + margin + 18), name, fill=color, font=font)
        x += 14 + 7 * len(name) + 16
    image.save(path)


def write_reports(results: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown_table(results))
    benchmarks = list(results["benchmarks"])
    plotted = "synthetic" if "synthetic" in benchmarks else benchmarks[0]
    draw_plot(results, os.path.join(out, "score_vs_kv.png"), plotted)


# --- Command line ------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gazejax.evaluate",
        description="Sweep methods x KV budgets x benchmarks on a trained workdir.",
    )
    parser.add_argument("--workdir", required=True, help="a training workdir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    parser.add_argument(
        "--methods",
        default="dense,gaze,dense_reduced,evict_question",
        help=f"comma-separated, of {', '.join(METHODS)}",
    )
    parser.add_argument(
        "--budgets",
        default=",".join(f"{b:g}" for b in DEFAULT_BUDGETS),
        help="fractions of a sample's visual KV entries (gaze: K = round(f * regions))",
    )
    parser.add_argument("--examples", type=int, default=288, help="examples per benchmark")
    parser.add_argument(
        "--benchmarks",
        default="synthetic",
        help="comma-separated: synthetic, jsonl:PATH[:NAME] (a generic JSONL benchmark)",
    )
    parser.add_argument(
        "--image-root",
        default=None,
        help="JSONL image paths are relative to it (the file's folder)",
    )
    parser.add_argument(
        "--video-root", default=None, help="JSONL video paths are relative to it (--image-root)"
    )
    parser.add_argument(
        "--max-frames", type=int, default=None, help="frames per JSONL video (the training data's)"
    )
    parser.add_argument("--fps", type=float, default=1.0, help="JSONL video sampling rate")
    parser.add_argument(
        "--jsonl-limit", type=int, default=None, help="score the first N lines of each JSONL"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--out", default=None, help="default: WORKDIR/eval")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (errors are printed to stderr, status 1)."""
    args = _parser().parse_args(argv)
    try:
        methods = parse_methods(
            [m.strip() for m in args.methods.split(",") if m.strip()], _floats(args.budgets)
        )
        checkpoint = load_checkpoint(args.workdir, args.step)
        with open(os.path.join(args.workdir, "config.json")) as f:
            raw_config = json.load(f)
        results = sweep(
            checkpoint,
            raw_config,
            methods,
            args.examples,
            [b.strip() for b in args.benchmarks.split(",") if b.strip()],
            args.batch_size,
            progress=not args.no_progress,
            image_root=args.image_root,
            video_root=args.video_root,
            max_frames=args.max_frames,
            fps=args.fps,
            jsonl_limit=args.jsonl_limit,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    out = args.out or os.path.join(args.workdir, "eval")
    results["workdir"] = os.path.abspath(args.workdir)
    write_reports(results, out)
    print(markdown_table(results))
    print(f"wrote {out}/results.json, results.md, score_vs_kv.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

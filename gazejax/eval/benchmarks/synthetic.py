"""Benchmark ``synthetic``: the synthetic set's eval split (the workdir's data settings and
seed), ``ceil(N / tasks)`` examples per enabled task, scored per task, per family
(single_region, multi_region, counting, video), per turn and overall (the mean over answers).
The prompt is the training template (ChatML with the workdir's system prompt), logged in
``results.json``.

With ``turns`` > 1 (the workdir's ``data.synthetic.turns``, or ``--turns``) an example is a
conversation about one scene: its first question is of the example's task, the later ones drawn
by the workdir's ``later_tasks`` (default: its task weights) about objects the earlier turns did
not mention (:class:`gazejax.data.synthetic.SyntheticVQA`). Each answer is scored teacher-forced
with the earlier questions and their reference answers in context, and counts for its own task,
family and turn.

The benchmark's info carries ``majority_answer``: each task's most common answer over the
training split's first 4096 conversations (:func:`gazejax.data.synthetic.majority_answers`)
and what answering it to every question of its task scores here (the answer prior: no model,
no picture), with the records' breakdowns; ``results.md`` shows it as a row."""

from __future__ import annotations

import math

import numpy as np
import tokenizers

from gazejax.data.batches import synthetic_examples
from gazejax.data.synthetic import TASKS, SyntheticConfig, SyntheticVQA, majority_answers
from gazejax.data.template import DEFAULT_SYSTEM_PROMPT
from gazejax.eval.benchmarks.base import Benchmark, LoadOptions
from gazejax.eval.examples import Example
from gazejax.eval.scoring import breakdowns, summarize

USAGE = "synthetic"
PRIOR_EXAMPLES = 4096
"""Training conversations whose answers give each task's majority answer."""


def _tuples(config: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def synthetic_benchmark(
    raw_config: dict, tokenizer: tokenizers.Tokenizer, examples: int, turns: int | None = None
) -> tuple[list[Example], dict]:
    """``ceil(examples / tasks)`` eval-split examples of every enabled synthetic task (the first
    turn's), ``turns`` questions each (None: the workdir's), and the benchmark's description."""
    data = raw_config.get("data", {})
    synthetic = _tuples(dict(data.get("synthetic", {})))
    weights = synthetic.pop("tasks", None) or dict.fromkeys(TASKS, 1.0)
    if turns is not None:
        synthetic["turns"] = turns
    synthetic["later_tasks"] = synthetic.get("later_tasks") or weights
    tasks = [t for t in TASKS if weights.get(t, 0) > 0]
    per_task = math.ceil(examples / len(tasks))
    seed = int(raw_config.get("seed", 0))
    system_prompt = data.get("system_prompt", DEFAULT_SYSTEM_PROMPT)
    train = SyntheticVQA(
        SyntheticConfig(**{**synthetic, "tasks": weights}, seed=seed), "train", size=PRIOR_EXAMPLES
    )
    majority = majority_answers(train, PRIOR_EXAMPLES)
    out, hits = [], []  # hits: (answer is its task's majority answer, family, turn)
    for task in tasks:
        make = synthetic_examples(
            {**synthetic, "tasks": {task: 1.0}}, "eval", seed, tokenizer, system_prompt
        )
        for index in range(per_task):
            items, info = make(index)
            family = info["family"]
            bucket = "video" if family == "video" else "image"
            out.append(Example(items, task, family, bucket, later_turns=info["turns"][1:]))
            turns_answers = zip(info["turns"], info["answers"], strict=True)
            for turn, ((name, kind), answer) in enumerate(turns_answers, start=1):
                hits.append((answer == majority.get(name), kind, turn))
    info = {
        "split": "eval",
        "seed": seed,
        "tasks": {t: TASKS[t][0] for t in tasks},
        "examples_per_task": per_task,
        "turns": synthetic.get("turns", 1),
        "system_prompt": system_prompt,
        "template": "ChatML (the training template); answers scored teacher-forced",
        "majority_answer": _majority_row(majority, hits),
    }
    return out, info


def _majority_row(majority: dict[str, str], hits: list[tuple[bool, str, int]]) -> dict:
    """The answer prior as a row of the report: scores and breakdowns of ``hits`` (reads no
    KV entry), and the ``answers`` (task -> majority answer)."""
    exact, family, turn = (np.asarray(x) for x in zip(*hits, strict=True))
    zeros, ones = np.zeros(len(exact)), np.ones(len(exact))
    arrays = [exact, zeros, zeros, ones]
    stats = {**summarize(*arrays), **breakdowns(arrays, family, turn)}
    return {"label": "majority answer", "seconds": 0.0, **stats, "answers": majority}


def load(spec: str, options: LoadOptions) -> Benchmark:
    """``synthetic`` (no argument): ``options.examples`` examples of the eval split."""
    if spec != "synthetic":
        raise ValueError(f"the synthetic benchmark takes no argument, got {spec!r}")
    checkpoint = options.checkpoint
    examples, info = synthetic_benchmark(
        options.raw_config, checkpoint.tokenizer, options.examples, options.turns
    )
    return Benchmark("synthetic", examples, info)

"""Benchmark ``synthetic``: the synthetic set's eval split (the workdir's data settings and
seed), ``ceil(N / tasks)`` examples per enabled task, scored per task, per family
(single_region, multi_region, counting, video) and overall (the mean over examples). The prompt
is the training template (ChatML with the workdir's system prompt), logged in
``results.json``."""

from __future__ import annotations

import math

import tokenizers

from gazejax.data.batches import synthetic_examples
from gazejax.data.synthetic import TASKS
from gazejax.data.template import DEFAULT_SYSTEM_PROMPT
from gazejax.eval.benchmarks.base import Benchmark, LoadOptions
from gazejax.eval.examples import Example

USAGE = "synthetic"


def _tuples(config: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def synthetic_benchmark(
    raw_config: dict, tokenizer: tokenizers.Tokenizer, examples: int
) -> tuple[list[Example], dict]:
    """``ceil(examples / tasks)`` eval-split examples of every enabled synthetic task, and the
    benchmark's description."""
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


def load(spec: str, options: LoadOptions) -> Benchmark:
    """``synthetic`` (no argument): ``options.examples`` examples of the eval split."""
    if spec != "synthetic":
        raise ValueError(f"the synthetic benchmark takes no argument, got {spec!r}")
    checkpoint = options.checkpoint
    examples, info = synthetic_benchmark(options.raw_config, checkpoint.tokenizer, options.examples)
    return Benchmark("synthetic", examples, info)

"""The sweep: every method (at every budget) on every benchmark, one jitted forward per batch;
the content of ``results.json``."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gazejax.data.packing import pack_batch
from gazejax.eval.benchmarks import LoadOptions, load_benchmark
from gazejax.eval.benchmarks.jsonl import JSONL_SCORING
from gazejax.eval.examples import Example, batch_shape
from gazejax.eval.methods import Method, Runner
from gazejax.eval.scoring import SCORING, jitted_scores
from gazejax.inference.checkpoints import Checkpoint
from gazejax.sharding import mesh_rules
from kernels.gaze_attention import TokenKind


class Progress:
    """A tqdm bar on stderr over ``total`` examples, or nothing when not ``enabled``."""

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
    progress: Progress | None = None,
    packed: dict | None = None,
) -> dict:
    """Scores ``examples`` with ``runner``: per-answer lists, an entry for every answer (turn)
    of every example (``exact``, ``loglik``, ``group``, ``option``, ``task``, ``family``,
    ``turn``: 1 for the first answer, ``visual_kv``, ``context_kv``, ``dense_kv``), the
    ``seconds`` taken and the gaze K per bucket (``top_k``). ``packed`` caches packed batches
    across methods of one packing config.

    Raises:
      ValueError: an example whose targets hold another number of answers than its turns.
    """
    method, config = runner.method, runner.config
    score = jitted_scores(runner)
    h, w = config.unit_grid
    dense_h, dense_w = method.dense_grid(config)
    region_size = math.prod(config.region_size)
    packed = {} if packed is None else packed
    keys = ("exact", "loglik", "group", "option", "task", "family", "turn")
    results = {k: [] for k in (*keys, "visual_kv", "context_kv", "dense_kv")}
    top_ks = {}
    start = time.monotonic()
    for bucket in sorted({e.bucket for e in examples}):
        chosen = [e for e in examples if e.bucket == bucket]
        shape = batch_shape(config, chosen)
        top_k = method.top_k(shape[2])
        if top_k is not None:
            top_ks[bucket] = top_k
        turns = max(len(e.turns) for e in chosen)
        for first in range(0, len(chosen), batch_size):
            batch = chosen[first : first + batch_size]
            padded = batch + [batch[-1]] * (batch_size - len(batch))
            key = (config.geometry, bucket, first)
            if key not in packed:
                packed[key] = pack_batch([e.items for e in padded], config.geometry, *shape, pad_id)
            inputs, targets = packed[key]
            exact, loglik, answered = (
                np.asarray(x) for x in score(checkpoint.params, inputs, targets, top_k, turns)
            )
            kind = np.asarray(inputs.meta.kind)[: len(batch)]
            num_visual = (kind == TokenKind.VISUAL).sum(-1)
            num_context = (kind == TokenKind.CONTEXT).sum(-1) * method.reads_context
            dense_kv = num_visual // (h * w) * dense_h * dense_w
            visual_kv = method.visual_kv(num_visual, top_k, region_size)
            for b, example in enumerate(batch):
                n = len(example.turns)
                if answered[b].tolist() != [True] * n + [False] * (turns + 1 - n):
                    raise ValueError(
                        f"an example of task {example.task!r} has {n} turns but its targets "
                        f"hold another number of answers ({answered[b].tolist()})"
                    )
                for t, (task, family) in enumerate(example.turns):
                    results["exact"].append(bool(exact[b, t]))
                    results["loglik"].append(float(loglik[b, t]))
                    results["group"].append(example.group)
                    results["option"].append(example.option)
                    results["task"].append(task)
                    results["family"].append(family)
                    results["turn"].append(t + 1)
                    results["visual_kv"].append(float(visual_kv[b]))
                    results["context_kv"].append(float(num_context[b]))
                    results["dense_kv"].append(float(dense_kv[b]))
            if progress is not None:
                progress.update(len(batch), method.label)
    results["seconds"] = time.monotonic() - start
    results["top_k"] = top_ks
    return results


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
    mesh: jax.sharding.Mesh | None = None,
    turns: int | None = None,
) -> dict:
    """Runs every method on every benchmark; the ``results.json`` content.

    ``benchmarks``: ``--benchmarks`` specs (:mod:`gazejax.eval.benchmarks`): ``"synthetic"``
    (``examples`` of the synthetic eval split) and ``"jsonl:PATH[:NAME]"`` (every line, or the
    first ``jsonl_limit``; see :func:`~gazejax.eval.benchmarks.jsonl.jsonl_benchmark` for
    ``image_root``, ``video_root``, ``max_frames`` and ``fps``; ``turns``: questions per
    synthetic conversation, None: the workdir's). ``mesh``: run each forward
    over it, activations split by the default logical axis rules (batch over ``data`` and
    ``fsdp``, sequence over ``sequence``, heads over ``tensor``), parameters replicated.
    """
    base = checkpoint.config
    notes = []
    for method in {type(m): m for m in methods}.values():  # once per method, not per budget
        notes.append(method.skip_reason(base) or method.note(base))
    notes = [n for n in notes if n]
    methods = [m for m in methods if not m.skip_reason(base)]
    if batch_size is None:
        batch_size = int(raw_config.get("batch_size", 8))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_token = raw_config.get("data", {}).get("pad_token", "<|endoftext|>")
    pad_id = checkpoint.tokenizer.token_to_id(pad_token) or 0
    options = LoadOptions(
        checkpoint,
        raw_config,
        examples,
        image_root,
        video_root,
        max_frames,
        fps,
        jsonl_limit,
        turns,
    )
    loaded = []
    for spec in benchmarks:  # load (and validate) every benchmark before the long part
        benchmark = load_benchmark(spec, options)
        if any(b.name == benchmark.name for b in loaded):
            raise ValueError(f"two benchmarks named {benchmark.name!r}: name one jsonl:PATH:NAME")
        loaded.append(benchmark)
    if mesh is not None:
        params = jax.device_put(checkpoint.params, NamedSharding(mesh, PartitionSpec()))
        checkpoint = dataclasses.replace(checkpoint, params=params)
    records = []
    for benchmark in loaded:
        bar = Progress(len(benchmark.examples) * len(methods), progress)
        packed: dict = {}
        try:
            for method in methods:
                runner = method.runner(base)
                with mesh_rules(mesh):
                    results = run_method(
                        checkpoint, runner, benchmark.examples, batch_size, pad_id, bar, packed
                    )
                records += benchmark.records(runner, results)
        finally:
            bar.close()
    return {
        "checkpoint": checkpoint_summary(checkpoint),
        "budget": "fraction of a sample's visual KV entries one answer query reads",
        "scoring": SCORING,
        "jsonl_scoring": JSONL_SCORING,
        "benchmarks": {b.name: b.info for b in loaded},
        "notes": notes,
        "records": records,
    }


def checkpoint_summary(checkpoint: Checkpoint) -> dict:
    """``results.json``'s ``checkpoint``: the step and the settings the methods depend on."""
    base = checkpoint.config
    trained = base.decoder.attention
    return {
        "step": checkpoint.step,
        "attention": trained,
        "top_k": base.decoder.gaze_top_k if trained == "gaze" else None,
        "num_context_tokens": base.num_context_tokens,
        "region_size": list(base.region_size),
        "unit_grid": list(base.unit_grid),
        "projector_compress": bool(base.projector.compress),
    }

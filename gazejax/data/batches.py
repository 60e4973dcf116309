"""Deterministic, resumable batches: batch ``s`` is a pure function of the step.

Each host packs its own slice of the global batch: host ``p`` of ``P`` takes examples
``s·B + p·B/P ... s·B + (p+1)·B/P - 1`` of the (already shuffled, random-access) example
sequence. Restarting at step ``s`` therefore reproduces the data exactly, with no iterator state.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tokenizers

from gazejax.data.packing import PackingError, Text, Visual, pack_batch
from gazejax.data.pipeline import example_items
from gazejax.data.records import DataError
from gazejax.data.sources import LOGGED_PER_KIND, ConversationSource, host_dataset
from gazejax.data.synthetic import TASKS, SyntheticConfig, SyntheticVQA, to_conversation
from gazejax.gaze.geometry import PackingGeometry
from gazejax.gaze.inputs import MultimodalInputs

_log = logging.getLogger(__name__)

Example = tuple[list[Text | Visual], Mapping[str, Any]]  # items, and info for evaluation


class BucketError(ValueError):
    """A sample does not fit its bucket; the message names the config key and the value needed."""


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """Static per-sample shapes: slots, visual units and regions."""

    length: int
    max_units: int
    num_regions: int


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A stream of examples of similar size, packed to one static shape.

    Each step draws one bucket (with probability proportional to ``weight``), so images are not
    padded to the length of videos and each bucket's shape compiles once. ``name`` is its key
    under ``config.data.buckets``, which errors name.
    """

    name: str
    example: Callable[[int], Example]
    shape: BatchShape
    weight: float = 1.0


class Batches:
    """``batches(step) -> (inputs, targets, infos)`` for this host's share of the batch.

    ``task_names`` lists every value the examples' ``info["task"]`` can take (for evaluation
    counts that agree across hosts).
    """

    def __init__(
        self,
        buckets: Sequence[Bucket],
        global_batch_size: int,
        geometry: PackingGeometry,
        seed: int = 0,
        pad_id: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        task_names: Sequence[str] = (),
    ):
        if global_batch_size % process_count:
            raise ValueError(
                f"batch_size ({global_batch_size}) must be divisible by the number of "
                f"processes ({process_count})"
            )
        self.buckets = [b for b in buckets if b.weight > 0]
        if not self.buckets:
            raise ValueError("no bucket with a positive weight")
        weights = np.array([b.weight for b in self.buckets], np.float64)
        self.probabilities = weights / weights.sum()
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.geometry = geometry
        self.seed = seed
        self.pad_id = pad_id
        self.offset = process_index * self.local_batch_size
        self.task_names = tuple(task_names)

    def bucket(self, step: int) -> Bucket:
        """The bucket of ``step`` (the same on every host)."""
        rng = np.random.default_rng([self.seed, step])
        return self.buckets[rng.choice(len(self.buckets), p=self.probabilities)]

    def indices(self, step: int) -> range:
        start = step * self.global_batch_size + self.offset
        return range(start, start + self.local_batch_size)

    def __call__(self, step: int) -> tuple[MultimodalInputs, jax.Array, list[Mapping[str, Any]]]:
        """This host's share of batch ``step``.

        Raises:
          ValueError: a sample does not fit its bucket, naming the config key
            (``config.data.buckets.NAME.FIELD``) and the value the sample needs.
        """
        bucket = self.bucket(step)
        examples = [bucket.example(i) for i in self.indices(step)]
        try:
            inputs, targets = pack_batch(
                [items for items, _ in examples],
                self.geometry,
                bucket.shape.length,
                bucket.shape.max_units,
                bucket.shape.num_regions,
                self.pad_id,
            )
        except PackingError as error:
            raise BucketError(
                f"config.data.buckets.{bucket.name}.{error.field}={error.given} is too small: a "
                f"sample of step {step} needs {error.needed} (unit grid {self.geometry.unit_grid}, "
                f"region_size {self.geometry.region_size})"
            ) from error
        return inputs, targets, [info for _, info in examples]


def synthetic_examples(
    config: Mapping[str, Any],
    split: str,
    seed: int,
    tokenizer: tokenizers.Tokenizer,
    system_prompt: str,
    size: int = 2**31 - 1,
) -> Callable[[int], Example]:
    """Example ``i`` of the synthetic set's ``split`` as packed-ready items (every turn's answer
    supervised), and its info: the first turn's ``task`` and ``family``, ``turns``, each
    turn's ``(task, family)``, and ``answers``, each turn's reference answer."""
    dataset = SyntheticVQA(SyntheticConfig(**dict(config), seed=seed), split=split, size=size)

    def example(index: int) -> Example:
        record = dataset[index % len(dataset)]
        conversation = to_conversation(record)["conversations"]
        items = example_items(conversation, [record["units"]], tokenizer, "<image>", system_prompt)
        turns = tuple((turn["task"], turn["family"]) for turn in record["turns"])
        answers = tuple(turn["answer"] for turn in record["turns"])
        info = {"task": record["task"], "family": record["family"], "turns": turns}
        return items, {**info, "answers": answers}

    return example


def synthetic_buckets(
    config: Mapping[str, Any],
    shapes: Mapping[str, Mapping[str, int]],
    split: str,
    seed: int,
    tokenizer: tokenizers.Tokenizer,
    system_prompt: str,
) -> list[Bucket]:
    """Two buckets of the synthetic set: image questions and video questions.

    Args:
      config: :class:`SyntheticConfig` fields, ``tasks`` (name -> weight) included.
      shapes: ``{"image": {length, max_units, num_regions}, "video": {...}}``.
    """
    config = dict(config)
    tasks = dict(config.pop("tasks"))
    buckets = []
    for name in ("image", "video"):
        chosen = {t: w for t, w in tasks.items() if (TASKS[t][0] == "video") == (name == "video")}
        if sum(chosen.values()) <= 0:
            continue
        example = synthetic_examples(
            {**config, "tasks": chosen}, split, seed, tokenizer, system_prompt
        )
        shape = BatchShape(**dict(shapes[name]))
        buckets.append(Bucket(name, example, shape, weight=sum(chosen.values())))
    return buckets


def jsonl_buckets(
    data: Mapping[str, Any],
    split: str,
    seed: int,
    tokenizer: tokenizers.Tokenizer,
    geometry: PackingGeometry,
) -> list[Bucket]:
    """One bucket over a LLaVA / Cambrian JSON(L) file, shuffled by ``seed``, repeated forever.

    ``data`` is the config's data section: ``jsonl.{train, eval, image_root, video_root,
    max_frames, max_skips}``, ``buckets.all``, ``system_prompt``, ``skip_bad_samples``. A bad
    record raises :class:`DataError`, or with ``skip_bad_samples`` is replaced by the next good
    one: the example's info then holds ``"dropped"``, ``{record index: DataError}`` of the bad
    records passed over (for :class:`SkippedRecords`).
    """
    spec = data["jsonl"]
    shape = BatchShape(**dict(data["buckets"]["all"]))
    source = ConversationSource(
        spec[split],
        spec["image_root"],
        image_size=geometry.image_size,
        max_frames=spec["max_frames"],
        video_root=spec["video_root"] or None,
        tokenizer=tokenizer,
        system_prompt=data["system_prompt"],
        max_length=shape.length,
        tokens_per_unit=geometry.slots_per_unit,
        max_units=shape.max_units,
    )
    # The shuffled order of record indices (the source's own shuffle, without reading records).
    order = host_dataset(
        range(len(source)), seed=seed, num_epochs=None, process_index=0, process_count=1
    )

    def example(index: int) -> Example:
        dropped = {}
        for attempt in range(spec["max_skips"] + 1):
            record_index = order[index + attempt]
            try:
                record = source[record_index]
            except DataError as error:
                if not data["skip_bad_samples"]:
                    raise
                dropped[record_index] = error
                continue
            info = {"task": spec.get("task", "jsonl"), "id": record["id"], "dropped": dropped}
            return record["items"], info
        raise DataError(
            f"{spec['max_skips'] + 1} bad records in a row from shuffled index {index}",
            spec[split],
        )

    return [Bucket("all", example, shape)]


class SkippedRecords:
    """The distinct bad records dropped from training so far (``train/skipped_samples``), by
    their index in the records file.

    :meth:`add` takes the infos of each batch that trains, so that a record counts once however
    often it is read (at start-up, ahead of time, in every epoch, by neighbouring examples).
    Each is logged when first dropped (the first ``LOGGED_PER_KIND`` of each error kind).
    """

    def __init__(self, indices: Iterable[int] = ()):
        self.indices = set(indices)
        self._logged: collections.Counter[str] = collections.Counter()

    def add(self, infos: Sequence[Mapping[str, Any]]) -> None:
        for info in infos:
            for index, error in info.get("dropped", {}).items():
                if index in self.indices:
                    continue
                self.indices.add(index)
                self._logged[error.kind] += 1
                if self._logged[error.kind] <= LOGGED_PER_KIND:
                    _log.warning("skipping a bad sample (%s): %s", error.kind, error)

    def __len__(self) -> int:
        return len(self.indices)

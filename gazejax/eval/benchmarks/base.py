"""What every benchmark source is: a loader from its ``--benchmarks`` spec to a
:class:`Benchmark` (examples, a description for ``results.json``, its records)."""

from __future__ import annotations

import dataclasses

from gazejax.eval.examples import Example
from gazejax.eval.methods.base import Runner
from gazejax.eval.scoring import record
from gazejax.inference.checkpoints import Checkpoint


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """What a benchmark may read besides its spec (the command line's settings).

    Attributes:
      checkpoint: the evaluated checkpoint (tokenizer, system prompt, image size).
      raw_config: the workdir's ``config.json``.
      examples: examples per benchmark, where a benchmark draws them (synthetic).
      image_root, video_root, max_frames, fps, jsonl_limit: see
        :func:`gazejax.eval.benchmarks.jsonl.jsonl_benchmark`.
      turns: questions per synthetic conversation (None: the workdir's ``data.synthetic``).
    """

    checkpoint: Checkpoint
    raw_config: dict
    examples: int
    image_root: str | None = None
    video_root: str | None = None
    max_frames: int | None = None
    fps: float = 1.0
    jsonl_limit: int | None = None
    turns: int | None = None


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark: its name in ``results.json``, its examples and its description."""

    name: str
    examples: list[Example]
    info: dict

    def records(self, runner: Runner, results: dict) -> list[dict]:
        """The ``results.json`` records of one method's per-example ``results``."""
        return [record(runner, results, self.name)]

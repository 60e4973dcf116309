"""The real-data source: LLaVA / Cambrian records with their images and videos, for grain.

:class:`ConversationSource` is a random-access source (``grain.MapDataset.source(...)``);
:func:`host_dataset` shuffles it by seed, shards it across hosts and repeats it. Bad samples
either raise :class:`~gazejax.data.records.DataError` (naming the records file and line or
index, and the image or video at fault) or, with ``skip_bad_samples=True``, are skipped:
``source[i]`` is then None, which grain's datasets drop when iterating, and
``source.skipped`` counts them by error kind.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import tokenizers
from etils import epath

from gazejax.data.images import read_image
from gazejax.data.packing import Text, Visual
from gazejax.data.pipeline import example_items
from gazejax.data.records import DataError, RecordFile
from gazejax.data.template import DEFAULT_SYSTEM_PROMPT
from gazejax.data.video import read_video
from gazejax.data.vocab import IMAGE_TOKEN

_log = logging.getLogger(__name__)
LOGGED_PER_KIND = 10  # skips logged per error kind; all are counted


class ConversationSource:
    """Random-access examples of a ``.json`` / ``.jsonl`` records file.

    ``source[i]`` is a dict:

    - ``id``: the record's id (its location when it has none); ``location``: a
      :class:`~gazejax.data.records.Location` (``str()``: ``"file:LINE"`` or ``"file[INDEX]"``).
    - ``conversations``: the turns, ``<video>`` normalised to ``<image>``.
    - ``visuals``: one float32 ``[frames, image_size, image_size, 3]`` array in [-1, 1] per
      placeholder, in order (``frames = 1`` for an image).
    - ``items``: only with a ``tokenizer``: :func:`to_items`'s text spans and visuals, checked
      by :func:`check_length` when ``max_length`` or ``max_units`` is given.

    Image paths are relative to ``image_root``, video paths (files or folders of frames) to
    ``video_root`` (default ``image_root``); an absolute path is used as is.

    With ``skip_bad_samples``, ``source[i]`` is None for a bad sample and ``skipped`` (a
    ``collections.Counter``: error kind → count, see ``DataError.kind``) counts it. Counts are
    per process: with grain worker processes, each worker counts its own.
    """

    def __init__(
        self,
        records_path: str | os.PathLike,
        image_root: str | os.PathLike,
        *,
        image_size: int,
        max_frames: int,
        video_root: str | os.PathLike | None = None,
        fps: float = 1.0,
        skip_bad_samples: bool = False,
        tokenizer: tokenizers.Tokenizer | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_length: int | None = None,
        tokens_per_unit: int = 0,
        max_units: int | None = None,
    ):
        if image_size < 1 or max_frames < 1 or fps <= 0:
            raise ValueError(
                f"need image_size >= 1, max_frames >= 1 and fps > 0, got "
                f"{image_size}, {max_frames} and {fps}"
            )
        self.records = RecordFile(records_path)
        self.image_root = epath.Path(image_root)  # local or cloud
        self.video_root = self.image_root if video_root is None else epath.Path(video_root)
        self.image_size, self.max_frames, self.fps = image_size, max_frames, fps
        self.skip_bad_samples = skip_bad_samples
        self.tokenizer, self.system_prompt = tokenizer, system_prompt
        self.max_length, self.tokens_per_unit, self.max_units = (
            max_length,
            tokens_per_unit,
            max_units,
        )
        self.skipped: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"ConversationSource({self.records.path}, {len(self)} records)"

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            return self._example(index)
        except DataError as error:
            if not self.skip_bad_samples:
                raise
            self.skipped[error.kind] += 1
            if self.skipped[error.kind] <= LOGGED_PER_KIND:
                _log.warning("skipping a bad sample (%s): %s", error.kind, error)
            return None

    def _example(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        try:
            if record.video is not None:
                frames, _ = read_video(
                    self.video_root / record.video,
                    image_size=self.image_size,
                    max_frames=self.max_frames,
                    fps=self.fps,
                )
                visuals = [frames]
            else:
                visuals = [
                    read_image(self.image_root / p, self.image_size)[None] for p in record.images
                ]
        except DataError as error:  # an image or video: add the record that names it
            raise record.location.error(f"record {record.id!r}: {error}", error.kind) from error
        example = {
            "id": record.id,
            "location": record.location,
            "conversations": record.conversations,
            "visuals": visuals,
        }
        if self.tokenizer is not None:
            items = to_items(example, self.tokenizer, self.system_prompt)
            if self.max_length is not None or self.max_units is not None:
                check_length(
                    items,
                    example,
                    max_length=self.max_length,
                    tokens_per_unit=self.tokens_per_unit,
                    max_units=self.max_units,
                )
            example["items"] = items
        return example


def to_items(
    example: Mapping[str, Any],
    tokenizer: tokenizers.Tokenizer,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> list[Text | Visual]:
    """An example's text spans (with targets) and visuals, in order (``pipeline.example_items``).

    Raises:
      ValueError: the tokenizer has no ``<image>`` token (a setup error, never skipped).
      DataError: the tokenized text's placeholders do not match the visuals (names the record).
    """
    if tokenizer.token_to_id(IMAGE_TOKEN) is None:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token")
    try:
        return example_items(
            example["conversations"], example["visuals"], tokenizer, IMAGE_TOKEN, system_prompt
        )
    except ValueError as exc:
        raise _record_error(example, str(exc), "placeholder") from exc


def check_length(
    items: list[Text | Visual],
    example: Mapping[str, Any],
    *,
    max_length: int | None,
    tokens_per_unit: int = 0,
    max_units: int | None = None,
) -> None:
    """Raises DataError (kind "too_long", naming the record) when a sample does not fit.

    Slots = text tokens + frames × ``tokens_per_unit``; with ``tokens_per_unit = h * w +
    num_context_tokens`` (the unit grid and its context tokens) this is the slot count that
    ``packing.pack_batch`` checks against its ``length``, and ``max_units`` its frame limit.
    """
    text = sum(len(item.ids) for item in items if isinstance(item, Text))
    units = sum(len(item.frames) for item in items if isinstance(item, Visual))
    slots = text + units * tokens_per_unit
    if max_length is not None and slots > max_length:
        raise _record_error(
            example,
            f"{slots} slots ({text} text tokens + {units} frame(s) x "
            f"{tokens_per_unit}) > max_length={max_length}",
            "too_long",
        )
    if max_units is not None and units > max_units:
        raise _record_error(example, f"{units} frame(s) > max_units={max_units}", "too_long")


def _record_error(example: Mapping[str, Any], reason: str, kind: str) -> DataError:
    return example["location"].error(f"record {example['id']!r}: {reason}", kind)


def host_dataset(
    source: Sequence,
    *,
    seed: int,
    num_epochs: int | None = 1,
    shuffle: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = False,
) -> grain.MapDataset:
    """This host's share of ``source`` (a random-access sequence, e.g. a
    :class:`ConversationSource`), shuffled by ``seed`` and repeated, as a MapDataset.

    Host ``p`` of ``n`` (default ``jax.process_index()`` / ``jax.process_count()``) takes
    records ``p, p + n, p + 2n, ...``: hosts are disjoint and together cover the source (all of
    it, or its first ``n * (len // n)`` records with ``drop_remainder``, so that every host has
    the same number). Each epoch reshuffles the shard (grain's per-epoch seed), the same on every
    run with the same ``seed``. ``num_epochs=None`` repeats forever. Skipped samples (None)
    stay in the MapDataset and are dropped when it is iterated.
    """
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    dataset = grain.MapDataset.source(source)
    if drop_remainder:
        dataset = dataset[: len(dataset) - len(dataset) % process_count]
    dataset = dataset[process_index::process_count]
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    return dataset.repeat(num_epochs)


def skip_summary(skipped: Mapping[str, int]) -> str:
    """A log line of skip counts, e.g. ``"3 skipped (image: 2, too_long: 1)"``."""
    total = sum(skipped.values())
    kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(skipped.items()))
    return f"{total} skipped ({kinds})" if total else "0 skipped"

"""LLaVA / Cambrian records from a ``.json`` file (a list) or a ``.jsonl`` file (one per line).

A record::

    {"id": ..., "image": "a.jpg" | ["a.jpg", "b.jpg"], "video": "clip.mp4" | "frames_dir/",
     "conversations": [{"from": "human" | "gpt", "value": "...<image>..."}, ...]}

``image`` and ``video`` are optional and exclusive. Each image has one ``<image>`` in the text, in
order; a video has exactly one placeholder, ``<image>`` or ``<video>`` (normalised to
``<image>``), that stands for all its frames. Placeholders belong in human turns.

:class:`RecordFile` gives random access without parsing the whole file: a ``.jsonl`` file is
indexed by byte offsets (blank lines skipped) and a line is parsed when asked for; a ``.json``
list is loaded at once. Each bad record raises :class:`DataError` naming the file and the line
(JSONL) or the record index (JSON) when it is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from gazejax.data.template import ConversationError, chatml_pieces
from gazejax.data.vocab import IMAGE_TOKEN, VIDEO_TOKEN

_JSON_WHITESPACE = b" \t\r\n"


class DataError(ValueError):
    """A bad input file or record.

    Attributes:
      reason: what is wrong, without the location.
      path: the file at fault (the records file once a record is known, else e.g. an image).
      line: 1-based line of a JSONL record or of a JSON syntax error, or None.
      index: the record's index in its file, or None.
      kind: the error's category, for counting skips: "file", "json", "record", "conversation",
        "placeholder", "image", "video" or "too_long".
    """

    def __init__(
        self,
        reason: str,
        path: str | os.PathLike,
        line: int | None = None,
        index: int | None = None,
        kind: str = "record",
    ):
        self.reason, self.path, self.line, self.index, self.kind = (
            reason,
            str(path),
            line,
            index,
            kind,
        )
        super().__init__(f"{Location(str(path), line, index)}: {reason}")

    def __reduce__(self):  # picklable across grain worker processes
        return type(self), (self.reason, self.path, self.line, self.index, self.kind)


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a record is: its file and its 1-based line (JSONL) or its index (JSON)."""

    path: str
    line: int | None = None
    index: int | None = None

    def __str__(self) -> str:
        """``"file.jsonl:12"`` (a line), ``"file.json[3]"`` (an index) or ``"file"``."""
        if self.line is not None:
            return f"{self.path}:{self.line}"
        if self.index is not None:
            return f"{self.path}[{self.index}]"
        return self.path

    def error(self, reason: str, kind: str = "record") -> DataError:
        """A DataError at this location."""
        return DataError(reason, self.path, self.line, self.index, kind)


@dataclasses.dataclass(frozen=True)
class Record:
    """A validated record; paths are as written in the file (relative to the roots).

    ``conversations`` have ``<video>`` replaced by ``<image>``; ``location`` names the record in
    later errors (its image or video, its length).
    """

    id: str
    conversations: list[dict[str, str]]
    images: tuple[str, ...]
    video: str | None
    location: Location


class RecordFile:
    """Random access to the records of a ``.json`` or ``.jsonl`` file.

    ``records[i]`` parses and validates record ``i`` (:class:`Record`) or raises
    :class:`DataError`. Picklable (paths, offsets and, for ``.json``, the loaded list).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(path)  # local or cloud
        if self.path.suffix not in (".json", ".jsonl"):
            raise DataError("expected a .json or .jsonl file", self.path, kind="file")
        self._items: list[Any] | None = None
        self._offsets = self._lines = np.zeros(0, np.int64)
        try:
            if self.path.suffix == ".jsonl":
                self._offsets, self._lines = _index_lines(self.path)
            else:
                self._items = _load_list(self.path)
        except OSError as exc:
            raise DataError(f"cannot read: {exc}", self.path, kind="file") from exc

    def __len__(self) -> int:
        return len(self._offsets) if self._items is None else len(self._items)

    def location(self, index: int) -> Location:
        """Where record ``index`` is: its line (JSONL) or its index (JSON)."""
        if self._items is not None:
            return Location(str(self.path), index=index)
        return Location(str(self.path), line=int(self._lines[index]))

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} in {self.path}")
        where = self.location(index)
        if self._items is not None:
            return parse_record(self._items[index], where)
        with self.path.open("rb") as f:
            f.seek(int(self._offsets[index]))
            raw = f.readline()
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise where.error(f"malformed JSON: {exc}", "json") from exc
        return parse_record(value, where)


def _index_lines(path: epath.Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and 1-based line numbers of the non-blank lines, int64 ``[records]`` each."""
    offsets, lines = [], []
    position = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip(_JSON_WHITESPACE):
                offsets.append(position)
                lines.append(number)
            position += len(raw)
    return np.asarray(offsets, np.int64), np.asarray(lines, np.int64)


def _load_list(path: epath.Path) -> list[Any]:
    try:
        with path.open("rb") as f:
            value = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"malformed JSON: {exc.msg} (column {exc.colno})", path, exc.lineno, kind="json"
        ) from exc
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, nesting too deep
        raise DataError(f"malformed JSON: {exc}", path, kind="json") from exc
    if not isinstance(value, list):
        raise DataError(
            f"a .json file must hold a list of records, got {type(value).__name__}",
            path,
            kind="json",
        )
    return value


def parse_visual_paths(value: Mapping, where: Location) -> tuple[list[str], str | None]:
    """``(images, video)`` of a record or benchmark line: ``"image"`` (a path or a list of
    paths, optional) and ``"video"`` (a path, optional), never both.

    Raises:
      DataError: at ``where``, naming the bad field.
    """
    images = value.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise where.error(f"'image' is neither a path nor a list of paths: {value.get('image')!r}")
    video = value.get("video")
    if video is not None and not (isinstance(video, str) and video):
        raise where.error(f"'video' is not a path: {video!r}")
    if video is not None and images:
        raise where.error("'image' or 'video', not both")
    return images, video


def parse_record(value: Any, where: Location) -> Record:
    """Validates one decoded record found at ``where``.

    Raises:
      DataError: not an object, no ``conversations`` list, bad turns or no assistant turn
        (template's check), ``image`` not a string or list of strings, ``video`` not a string,
        both ``image`` and ``video``, a placeholder in an assistant turn, or a placeholder count
        that does not match the images (or the one video).
    """
    error = where.error
    if not isinstance(value, Mapping):
        raise error(f"record is not a JSON object: {type(value).__name__}")
    conversations = value.get("conversations")
    if not isinstance(conversations, list):
        raise error(
            "missing 'conversations' (a list of turns)"
            if conversations is None
            else "'conversations' is not a list"
        )
    try:
        chatml_pieces(conversations)
    except ConversationError as exc:
        raise error(str(exc), "conversation") from exc
    images, video = parse_visual_paths(value, where)
    for turn in conversations:
        if turn["from"] == "gpt" and (IMAGE_TOKEN in turn["value"] or VIDEO_TOKEN in turn["value"]):
            raise error("a placeholder in an assistant (gpt) turn", "placeholder")
    text = "".join(turn["value"] for turn in conversations)
    num_image, num_video = text.count(IMAGE_TOKEN), text.count(VIDEO_TOKEN)
    if video is None and (num_video or num_image != len(images)):
        raise error(
            f"{num_image} {IMAGE_TOKEN} and {num_video} {VIDEO_TOKEN} placeholder(s) "
            f"for {len(images)} image(s)",
            "placeholder",
        )
    if video is not None and num_image + num_video != 1:
        raise error(
            f"{num_image + num_video} placeholder(s) ({IMAGE_TOKEN} or {VIDEO_TOKEN}) "
            "for 1 video: want exactly one",
            "placeholder",
        )
    return Record(
        id=str(value.get("id", where)),
        conversations=[
            {"from": turn["from"], "value": turn["value"].replace(VIDEO_TOKEN, IMAGE_TOKEN)}
            for turn in conversations
        ],
        images=tuple(images),
        video=video,
        location=where,
    )

"""The synthetic visual-QA set: seeded scenes of coloured shapes, and questions that need them.

An example is one image (``kind="image"``) or a clip of ``video_frames`` frames
(``kind="video"``) of objects on a dark, lightly noisy background. Every object has a shape, a
colour, a size (small or large) and a cell of a coarse ``grid × grid`` layout: one object per
cell, inset by at least a pixel, so objects never overlap or touch. In a clip, some objects are
there from the first frame and exactly one new object appears in each later frame; objects never
move or vanish. Objects named in a question are the only ones their phrase fits.

Tasks (``TASKS``, by family):

- ``single_region``: ``color`` "what color is the circle?", ``shape`` "what shape is the red
  object?", ``size`` "what size is the red circle?".
- ``multi_region``: ``order`` "list the shapes from left to right." (objects in distinct
  columns), ``relation`` "is the red object left of the square?" (left of / right of / above /
  below), ``compare_size`` "which is larger, the circle or the square?".
- ``counting``: ``count`` "how many squares?" / "how many red objects?" (answer "zero"...).
- ``video``: ``video_appear`` "what color is the object that appears in the third frame?",
  ``video_order`` "which came first, the circle or the square?".

Example ``i`` of a split is drawn from ``np.random.default_rng([seed, split, i])``: random access,
deterministic, independent of the set's size. Train and eval never share a scene: one bit of a
hash of the scene (its objects' attributes, cells and frames, before pixel jitter and noise)
names its split, and each split redraws scenes that belong to the other.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from gazejax.data.vocab import IMAGE_TOKEN, NUMBER_WORDS, ORDINALS

SHAPES = ("square", "circle", "triangle", "cross")
PLURALS = {"square": "squares", "circle": "circles", "triangle": "triangles", "cross": "crosses"}
COLORS = {  # RGB in [0, 1]
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.15),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (0.95, 0.9, 0.1),
    "white": (0.95, 0.95, 0.95),
    "purple": (0.6, 0.15, 0.85),
}
SIZES = ("small", "large")
RELATIONS = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}
"""Relation → (axis of a (row, col) cell, sign): "A rel B" holds iff sign·(A − B) > 0 on axis."""
SPLITS = {"train": 0, "eval": 1}

_MAX_DRAWS = 64  # scenes drawn per example before giving up on landing in the split


class _Object(NamedTuple):
    shape: str
    color: str
    size: str
    cell: tuple[int, int]  # (row, col)
    frame: int  # the first frame it is in (0 for images)


class _Scene(NamedTuple):
    objects: list[_Object]
    question: str
    answer: str


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _key(ref: str, shape: str, color: str) -> tuple[str, ...]:
    """What a referring phrase of kind ``ref`` ("shape", "color", "both") says of an object."""
    return {"shape": (shape,), "color": (color,), "both": (color, shape)}[ref]


def _phrase(obj: _Object, ref: str) -> str:
    """The phrase naming ``obj`` by ``ref``: "the circle", "the red object", "the red circle"."""
    if ref == "shape":
        return f"the {obj.shape}"
    if ref == "color":
        return f"the {obj.color} object"
    return f"the {obj.color} {obj.shape}"


def _word(obj: _Object, ref: str) -> str:
    """The one word that names ``obj`` by ``ref`` ("shape" or "color")."""
    return obj.shape if ref == "shape" else obj.color


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """The synthetic set; validated on construction (ValueError names the field).

    - ``image_size``, ``grid``: square images of ``image_size`` px cut into ``grid × grid``
      cells (64 and 4: 16 px cells, 2×2 patches of a patch-8 ViT each).
    - ``min_objects``, ``max_objects``: objects per image, and per clip's first frame. "order"
      needs distinct columns, so it holds at most ``grid`` objects.
    - ``video_frames``: frames per clip; one new object appears in each frame after the first.
    - ``shapes``, ``colors``: the subsets of ``SHAPES`` and ``COLORS`` used (>= 3 each).
    - ``object_sizes``: sides of small and large objects, as fractions of a cell's side.
    - ``jitter``: place each object at a random offset inside its cell (at least a pixel from
      its edges); ``False`` centres it, so an object aligned with a patch always looks the same.
    - ``background``: range of the background's grey level; ``noise``: std of per-pixel Gaussian
      noise; both in [0, 1] pixel units (before the mapping to [-1, 1]).
    - ``tasks``: task name (``TASKS``) → sampling weight; a weight of 0 disables the task.
    - ``seed``: with the split and the index, fixes every example.
    """

    image_size: int = 64
    grid: int = 4
    min_objects: int = 1
    max_objects: int = 4
    video_frames: int = 4
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    object_sizes: tuple[float, float] = (0.5, 0.75)
    jitter: bool = True
    background: tuple[float, float] = (0.0, 0.3)
    noise: float = 0.02
    tasks: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(TASKS, 1.0)
    )
    seed: int = 0

    def __post_init__(self):
        if self.grid < 1 or self.image_size % self.grid:
            raise ValueError(f"image_size {self.image_size} must be a multiple of grid {self.grid}")
        small, large = self.object_sides.values()
        cell = self.image_size // self.grid
        if not 5 <= small < large <= cell - 2:  # below 5 px, shapes look alike
            raise ValueError(
                f"object_sizes {self.object_sizes} give sides {small}, {large} px in a {cell} px "
                f"cell; need 5 <= small < large <= cell - 2"
            )
        for name, values, known in (
            ("shapes", self.shapes, SHAPES),
            ("colors", self.colors, COLORS),
        ):
            if len(set(values)) != len(values) or len(values) < 3 or not set(values) <= set(known):
                raise ValueError(f"{name} must be >= 3 distinct of {tuple(known)}, got {values}")
        cells = self.grid * self.grid
        if not 1 <= self.min_objects <= self.max_objects <= min(cells, len(NUMBER_WORDS) - 1):
            raise ValueError(
                f"need 1 <= min_objects ({self.min_objects}) <= max_objects ({self.max_objects}) "
                f"<= min(grid², {len(NUMBER_WORDS) - 1})"
            )
        if unknown := set(self.tasks) - set(TASKS):
            raise ValueError(f"unknown tasks {sorted(unknown)}; known: {list(TASKS)}")
        if min(self.tasks.values(), default=0) < 0 or sum(self.tasks.values()) <= 0:
            raise ValueError(f"task weights must be >= 0 with a positive sum, got {self.tasks}")
        enabled = {TASKS[name][0] for name, weight in self.tasks.items() if weight > 0}
        if "multi_region" in enabled and self.max_objects < 2:
            raise ValueError("multi_region tasks need max_objects >= 2")
        if "video" in enabled and not (
            2 <= self.video_frames <= len(ORDINALS)
            and self.max_objects + self.video_frames - 1 <= cells
        ):
            raise ValueError(
                f"video tasks need 2 <= video_frames ({self.video_frames}) <= {len(ORDINALS)} "
                f"and max_objects + video_frames - 1 <= grid² ({cells})"
            )
        if not 0 <= self.background[0] <= self.background[1] <= 1 or self.noise < 0:
            raise ValueError(f"need 0 <= background {self.background} <= 1 and noise >= 0")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def object_sides(self) -> dict[str, int]:
        """Size name → side of the object's square bounding box in pixels."""
        cell = self.image_size // self.grid
        return {name: round(f * cell) for name, f in zip(SIZES, self.object_sizes, strict=True)}


# --- Scenes: cells, attributes, questions ------------------------------------------------------


class _Palette:
    """Draws objects' (shape, color) so that each named object is the only one its phrase fits.

    Named objects must be drawn before the others.
    """

    def __init__(self, config: SyntheticConfig):
        self._pairs = [(s, c) for s in config.shapes for c in config.colors]
        self._owned: list[tuple[str, tuple[str, ...]]] = []  # (ref, key) of named objects
        self._drawn: list[tuple[str, str]] = []

    def draw(self, rng: np.random.Generator, ref: str | None = None) -> tuple[str, str]:
        options = [p for p in self._pairs if all(_key(r, *p) != k for r, k in self._owned)]
        if ref is not None:
            taken = {_key(ref, *p) for p in self._drawn}
            options = [p for p in options if _key(ref, *p) not in taken]
        pair = _pick(rng, options)
        if ref is not None:
            self._owned.append((ref, _key(ref, *pair)))
        self._drawn.append(pair)
        return pair


def _num_objects(
    rng: np.random.Generator, config: SyntheticConfig, low: int = 1, high: int | None = None
) -> int:
    """An object count in ``[max(low, min_objects), min(high, max_objects)]``, clamped."""
    high = config.max_objects if high is None else min(high, config.max_objects)
    low = min(max(low, config.min_objects), high)
    return int(rng.integers(low, high + 1))


def _cells(
    rng: np.random.Generator, grid: int, n: int, axis: int = 0, apart: int = 0
) -> list[tuple[int, int]]:
    """``n`` distinct random (row, col) cells; the first ``apart`` differ pairwise on ``axis``."""
    free = [(r, c) for r in range(grid) for c in range(grid)]
    cells: list[tuple[int, int]] = []
    for i in range(n):
        options = [c for c in free if i >= apart or all(c[axis] != d[axis] for d in cells)]
        cells.append(_pick(rng, options))
        free.remove(cells[-1])
    return cells


def _objects(
    rng: np.random.Generator,
    config: SyntheticConfig,
    cells: Sequence[tuple[int, int]],
    frames: Sequence[int] | None = None,
    named: Sequence[tuple[int, str]] = (),
) -> list[_Object]:
    """Objects at ``cells`` (first in ``frames``); ``named``: (index, ref) pairs kept unique."""
    palette = _Palette(config)
    pairs: dict[int, tuple[str, str]] = {i: palette.draw(rng, ref) for i, ref in named}
    for i in range(len(cells)):
        if i not in pairs:
            pairs[i] = palette.draw(rng)
    frames = [0] * len(cells) if frames is None else frames
    return [_Object(*pairs[i], _pick(rng, SIZES), cells[i], frames[i]) for i in range(len(cells))]


def _ask_color(rng: np.random.Generator, config: SyntheticConfig) -> _Scene:
    cells = _cells(rng, config.grid, _num_objects(rng, config))
    objects = _objects(rng, config, cells, named=[(0, "shape")])
    return _Scene(objects, f"what color is {_phrase(objects[0], 'shape')}?", objects[0].color)


def _ask_shape(rng: np.random.Generator, config: SyntheticConfig) -> _Scene:
    cells = _cells(rng, config.grid, _num_objects(rng, config))
    objects = _objects(rng, config, cells, named=[(0, "color")])
    return _Scene(objects, f"what shape is {_phrase(objects[0], 'color')}?", objects[0].shape)


def _ask_size(rng: np.random.Generator, config: SyntheticConfig) -> _Scene:
    cells = _cells(rng, config.grid, _num_objects(rng, config))
    objects = _objects(rng, config, cells, named=[(0, "both")])
    return _Scene(objects, f"what size is {_phrase(objects[0], 'both')}?", objects[0].size)


def _ask_order(rng: np.random.Generator, config: SyntheticConfig) -> _Scene:
    n = _num_objects(rng, config, low=2, high=config.grid)
    objects = _objects(rng, config, _cells(rng, config.grid, n, axis=1, apart=n))
    ref = _pick(rng, ("shape", "color"))
    answer = " ".join(_word(o, ref) for o in sorted(objects, key=lambda o: o.cell[1]))
    return _Scene(objects, f"list the {ref}s from left to right.", answer)


def _ask_relation(rng: np.random.Generator, config: SyntheticConfig) -> _Scene:
    relation = _pick(rng, list(RELATIONS))
    axis, sign = RELATIONS[relation]
    n = _num_objects(rng, config, low=2)
    refs = [_pick(rng, ("shape", "color")) for _ in range(2)]
    cells = _cells(rng, config.grid, n, axis=axis, apart=2)
    objects = _objects(rng, config, cells, named=list(enumerate(refs)))
    a, b = objects[:2]
    answer = "yes" if sign * (a.cell[axis] - b.cell[axis]) > 0 else "no"
    return _Scene(objects, f"is {_phrase(a, refs[0])} {relation} {_phrase(b, refs[1])}?", answer)


def _ask_compare_size(rng: np.random.Generator, config: SyntheticConfig) -> _Scene:
    ref = _pick(rng, ("shape", "color"))
    cells = _cells(rng, config.grid, _num_objects(rng, config, low=2))
    objects = _objects(rng, config, cells, named=[(0, ref), (1, ref)])
    large = int(rng.integers(2))
    for i in (0, 1):
        objects[i] = objects[i]._replace(size=SIZES[int(i == large)])
    comparison = _pick(rng, ("larger", "smaller"))
    answer = objects[large if comparison == "larger" else 1 - large]
    question = f"which is {comparison}, {_phrase(objects[0], ref)} or {_phrase(objects[1], ref)}?"
    return _Scene(objects, question, _word(answer, ref))


def _ask_count(rng: np.random.Generator, config: SyntheticConfig) -> _Scene:
    # The count is uniform over 0..max_objects, so that no answer dominates.
    ref = _pick(rng, ("shape", "color"))
    values = config.shapes if ref == "shape" else config.colors
    value = _pick(rng, values)
    count = int(rng.integers(config.max_objects + 1))
    n = _num_objects(rng, config, low=count)
    others = [v for v in values if v != value]
    words = [value] * count + [_pick(rng, others) for _ in range(n - count)]
    objects = []
    for word, cell in zip(words, _cells(rng, config.grid, n), strict=True):
        shape = word if ref == "shape" else _pick(rng, config.shapes)
        color = word if ref == "color" else _pick(rng, config.colors)
        objects.append(_Object(shape, color, _pick(rng, SIZES), cell, 0))
    question = f"how many {PLURALS[value]}?" if ref == "shape" else f"how many {value} objects?"
    return _Scene(objects, question, NUMBER_WORDS[count])


def _clip_layout(
    rng: np.random.Generator, config: SyntheticConfig
) -> tuple[list[tuple[int, int]], list[int]]:
    """Cells and first frames of a clip: some objects at frame 0, then one new per frame."""
    initial = _num_objects(rng, config)
    cells = _cells(rng, config.grid, initial + config.video_frames - 1)
    return cells, [0] * initial + list(range(1, config.video_frames))


def _ask_video_appear(rng: np.random.Generator, config: SyntheticConfig) -> _Scene:
    cells, frames = _clip_layout(rng, config)
    objects = _objects(rng, config, cells, frames)
    frame = int(rng.integers(1, config.video_frames))
    target = objects[frames.index(frame)]
    ref = _pick(rng, ("shape", "color"))
    question = f"what {ref} is the object that appears in the {ORDINALS[frame]} frame?"
    return _Scene(objects, question, _word(target, ref))


def _ask_video_order(rng: np.random.Generator, config: SyntheticConfig) -> _Scene:
    cells, frames = _clip_layout(rng, config)
    first_frames = [int(f) for f in rng.choice(config.video_frames, size=2, replace=False)]
    # An object per chosen frame; at frame 0, any of the objects present from the start.
    named = [
        int(rng.integers(frames.count(0))) if f == 0 else frames.index(f) for f in first_frames
    ]
    ref = _pick(rng, ("shape", "color"))
    objects = _objects(rng, config, cells, frames, named=[(i, ref) for i in named])
    a, b = (objects[i] for i in named)
    question = f"which came first, {_phrase(a, ref)} or {_phrase(b, ref)}?"
    return _Scene(objects, question, _word(min(a, b, key=lambda o: o.frame), ref))


TASKS: dict[str, tuple[str, Callable[[np.random.Generator, SyntheticConfig], _Scene]]] = {
    "color": ("single_region", _ask_color),
    "shape": ("single_region", _ask_shape),
    "size": ("single_region", _ask_size),
    "order": ("multi_region", _ask_order),
    "relation": ("multi_region", _ask_relation),
    "compare_size": ("multi_region", _ask_compare_size),
    "count": ("counting", _ask_count),
    "video_appear": ("video", _ask_video_appear),
    "video_order": ("video", _ask_video_order),
}
"""Task name → (family, scene builder)."""


# --- Rendering ---------------------------------------------------------------------------------


@functools.cache
def _mask(shape: str, side: int) -> np.ndarray:
    """bool [side, side]: the shape's pixels in its bounding box (sampled at pixel centres)."""
    t = (np.arange(side) + 0.5) / side * 2 - 1  # pixel centres in [-1, 1]
    v, u = t[:, None], t[None, :]  # v: down, u: right
    mask = {
        "square": np.ones((side, side), bool),
        "circle": u**2 + v**2 <= 1,
        "triangle": np.abs(u) <= (v + 1) / 2,  # apex up
        "cross": (np.abs(u) <= 1 / 3) | (np.abs(v) <= 1 / 3),
    }[shape]
    mask.setflags(write=False)
    return mask


def _offset(rng: np.random.Generator, room: int, jitter: bool) -> int:
    """An object's offset in its cell: random in ``[1, room)`` with ``jitter``, else centred."""
    return int(rng.integers(1, room)) if jitter else room // 2


def _render(
    rng: np.random.Generator, config: SyntheticConfig, objects: Sequence[_Object], num_frames: int
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Pixels float32 [num_frames, H, W, 3] in [-1, 1], and each object's (y0, x0, y1, x1) box.

    An object sits at a random offset inside its cell, at least a pixel from the cell's edges
    (centred without ``config.jitter``), and is drawn in every frame from its first on.
    """
    cell = config.image_size // config.grid
    sides = config.object_sides
    level = rng.uniform(*config.background)
    pixels = np.full((num_frames, config.image_size, config.image_size, 3), level, np.float32)
    boxes = []
    for obj in objects:
        side = sides[obj.size]
        y0, x0 = (k * cell + _offset(rng, cell - side, config.jitter) for k in obj.cell)
        box = pixels[obj.frame :, y0 : y0 + side, x0 : x0 + side]  # a view
        box[:, _mask(obj.shape, side)] = COLORS[obj.color]
        boxes.append((y0, x0, y0 + side, x0 + side))
    if config.noise > 0:
        pixels += config.noise * rng.standard_normal(pixels.shape, np.float32)
    np.clip(pixels, 0, 1, out=pixels)
    pixels *= 2
    pixels -= 1
    return pixels, boxes


def _split_of(objects: Sequence[_Object]) -> int:
    """The split (0 train, 1 eval) a scene belongs to: one bit of a hash of its objects."""
    scene = sorted((o.frame, o.cell, o.shape, o.color, o.size) for o in objects)
    return hashlib.blake2b(repr(scene).encode(), digest_size=8).digest()[0] & 1


# --- The data source ---------------------------------------------------------------------------


class SyntheticVQA:
    """Random-access synthetic VQA examples; a grain ``RandomAccessDataSource``.

    ``source[i]`` is a dict:

    - ``units``: float32 [U, H, W, 3] in [-1, 1] (SigLIP normalisation); U = 1 for an image,
      ``video_frames`` for a clip.
    - ``kind``: "image" | "video"; ``task``: a name in ``TASKS``; ``family``: its family.
    - ``question``, ``answer``: lower-case text; the answer is one or a few words.
    - ``objects``: tuple of dicts ``{"shape", "color", "size", "bbox": (y0, x0, y1, x1) pixels,
      end-exclusive, "frame": index of the first frame it is in}``, in raster order of cells.
      Questions count frames from one: "the third frame" is frame 2.
    """

    def __init__(self, config: SyntheticConfig, split: str = "train", *, size: int):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.config = config
        self.split = split
        self._size = size
        self._tasks = [name for name, weight in config.tasks.items() if weight > 0]
        weights = np.array([config.tasks[name] for name in self._tasks], np.float64)
        self._probs = weights / weights.sum()

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"SyntheticVQA(split={self.split!r}, size={self._size}, config={self.config})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        if not 0 <= index < self._size:
            raise IndexError(f"index {index} out of range for size {self._size}")
        split = SPLITS[self.split]
        rng = np.random.default_rng([self.config.seed, split, index])
        task = self._tasks[int(rng.choice(len(self._tasks), p=self._probs))]
        family, build = TASKS[task]
        for _ in range(_MAX_DRAWS):
            scene = build(rng, self.config)
            if _split_of(scene.objects) == split:
                break
        else:
            raise RuntimeError(
                f"no {self.split} scene for task {task!r} in {_MAX_DRAWS} draws: "
                "the config allows too few distinct scenes"
            )
        objects = sorted(scene.objects, key=lambda o: o.cell)
        num_frames = self.config.video_frames if family == "video" else 1
        units, boxes = _render(rng, self.config, objects, num_frames)
        return {
            "units": units,
            "kind": "video" if family == "video" else "image",
            "question": scene.question,
            "answer": scene.answer,
            "task": task,
            "family": family,
            "objects": tuple(
                {"shape": o.shape, "color": o.color, "size": o.size, "bbox": box, "frame": o.frame}
                for o, box in zip(objects, boxes, strict=True)
            ),
        }


def to_conversation(example: Mapping[str, Any]) -> dict[str, list[dict[str, str]]]:
    """The example's text as a LLaVA / Cambrian record, ``{"conversations": [human, gpt]}``.

    One ``<image>`` placeholder stands for all the example's units, image or clip, as in
    Cambrian-S's video data: the loader expands it into ``example["units"]``, frame by frame.
    """
    return {
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{example['question']}"},
            {"from": "gpt", "value": example["answer"]},
        ]
    }

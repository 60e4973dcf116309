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

With ``turns`` > 1 an example is a conversation of several questions about one scene: the
later turns ask about objects (in a clip, a frame's new object) that the earlier turns did not
mention, where the scene has any left (:class:`SyntheticVQA`).

Example ``i`` of a split is drawn from ``np.random.default_rng([seed, split, i])``: random access,
deterministic, independent of the set's size. Train and eval never share a scene: one bit of a
hash of the scene (its objects' attributes, cells and frames, before pixel jitter and noise)
names its split, and each split redraws scenes that belong to the other.
"""

from __future__ import annotations

import collections
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
_MAX_TURNS = 4  # a 2-frame clip has few distinct questions
_DRAWS_PER_TASK = 4  # a conversation's later turn redraws a task's question that repeats


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
    - ``turns``: questions per example. 1: one question, its scene drawn to fit it. More: a
      conversation about one scene (see :class:`SyntheticVQA`).
    - ``later_tasks``: the weights of the second and later turns' tasks (None: ``tasks``); a
      turn's task is always of the first's kind (image or video).
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
    turns: int = 1
    later_tasks: Mapping[str, float] | None = None
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
        for name, weights in (("tasks", self.tasks), ("later_tasks", self.later_weights)):
            if unknown := set(weights) - set(TASKS):
                raise ValueError(f"unknown {name} {sorted(unknown)}; known: {list(TASKS)}")
            if min(weights.values(), default=0) < 0 or sum(weights.values()) <= 0:
                raise ValueError(f"{name} weights must be >= 0 with a positive sum, got {weights}")
        if not 1 <= self.turns <= _MAX_TURNS:
            raise ValueError(f"turns must be in [1, {_MAX_TURNS}], got {self.turns}")
        enabled = {TASKS[name][0] for name, weight in self.tasks.items() if weight > 0}
        if self.turns > 1:
            later = {TASKS[name][0] for name, weight in self.later_weights.items() if weight > 0}
            for video in {f == "video" for f in enabled} - {f == "video" for f in later}:
                raise ValueError(
                    f"turns > 1 needs a later_tasks task of each kind the tasks have: none is a "
                    f"{'video' if video else 'image'} task in {dict(self.later_weights)}"
                )
            enabled |= later
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
    def later_weights(self) -> Mapping[str, float]:
        """The weights of the later turns' tasks: ``later_tasks``, else ``tasks``."""
        return self.tasks if self.later_tasks is None else self.later_tasks

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


# --- Questions: the text and answer of each task about given objects ---------------------------


def _attribute_turn(attribute: str, obj: _Object, ref: str) -> tuple[str, str]:
    """ "what color is the circle?": ``obj``'s ``attribute`` (color, shape or size)."""
    return f"what {attribute} is {_phrase(obj, ref)}?", getattr(obj, attribute)


def _order_turn(objects: Sequence[_Object], ref: str) -> tuple[str, str]:
    """ "list the shapes from left to right." (objects in distinct columns)."""
    answer = " ".join(_word(o, ref) for o in sorted(objects, key=lambda o: o.cell[1]))
    return f"list the {ref}s from left to right.", answer


def _relation_turn(
    a: _Object, ref_a: str, relation: str, b: _Object, ref_b: str
) -> tuple[str, str]:
    """ "is the red object left of the square?" (``a`` and ``b`` apart on the relation's axis)."""
    axis, sign = RELATIONS[relation]
    answer = "yes" if sign * (a.cell[axis] - b.cell[axis]) > 0 else "no"
    return f"is {_phrase(a, ref_a)} {relation} {_phrase(b, ref_b)}?", answer


def _compare_turn(a: _Object, b: _Object, ref: str, comparison: str) -> tuple[str, str]:
    """ "which is larger, the circle or the square?" (``a`` and ``b`` of different sizes)."""
    larger, smaller = (a, b) if a.size == "large" else (b, a)
    answer = larger if comparison == "larger" else smaller
    return f"which is {comparison}, {_phrase(a, ref)} or {_phrase(b, ref)}?", _word(answer, ref)


def _count_turn(objects: Sequence[_Object], ref: str, value: str) -> tuple[str, str]:
    """ "how many squares?" / "how many red objects?": the objects whose ``ref`` is ``value``."""
    count = sum(_word(o, ref) == value for o in objects)
    question = f"how many {PLURALS[value]}?" if ref == "shape" else f"how many {value} objects?"
    return question, NUMBER_WORDS[count]


def _appear_turn(objects: Sequence[_Object], frame: int, ref: str) -> tuple[str, str]:
    """ "what color is the object that appears in the third frame?" (``frame`` >= 1)."""
    (target,) = (o for o in objects if o.frame == frame)
    question = f"what {ref} is the object that appears in the {ORDINALS[frame]} frame?"
    return question, _word(target, ref)


def _first_turn(a: _Object, b: _Object, ref: str) -> tuple[str, str]:
    """ "which came first, the circle or the square?" (``a`` and ``b`` in different frames)."""
    first = min(a, b, key=lambda o: o.frame)
    return f"which came first, {_phrase(a, ref)} or {_phrase(b, ref)}?", _word(first, ref)


def _ask_color(rng: np.random.Generator, config: SyntheticConfig) -> _Scene:
    cells = _cells(rng, config.grid, _num_objects(rng, config))
    objects = _objects(rng, config, cells, named=[(0, "shape")])
    return _Scene(objects, *_attribute_turn("color", objects[0], "shape"))


def _ask_shape(rng: np.random.Generator, config: SyntheticConfig) -> _Scene:
    cells = _cells(rng, config.grid, _num_objects(rng, config))
    objects = _objects(rng, config, cells, named=[(0, "color")])
    return _Scene(objects, *_attribute_turn("shape", objects[0], "color"))


def _ask_size(rng: np.random.Generator, config: SyntheticConfig) -> _Scene:
    cells = _cells(rng, config.grid, _num_objects(rng, config))
    objects = _objects(rng, config, cells, named=[(0, "both")])
    return _Scene(objects, *_attribute_turn("size", objects[0], "both"))


def _ask_order(rng: np.random.Generator, config: SyntheticConfig) -> _Scene:
    n = _num_objects(rng, config, low=2, high=config.grid)
    objects = _objects(rng, config, _cells(rng, config.grid, n, axis=1, apart=n))
    return _Scene(objects, *_order_turn(objects, _pick(rng, ("shape", "color"))))


def _ask_relation(rng: np.random.Generator, config: SyntheticConfig) -> _Scene:
    relation = _pick(rng, list(RELATIONS))
    axis, _ = RELATIONS[relation]
    n = _num_objects(rng, config, low=2)
    refs = [_pick(rng, ("shape", "color")) for _ in range(2)]
    cells = _cells(rng, config.grid, n, axis=axis, apart=2)
    objects = _objects(rng, config, cells, named=list(enumerate(refs)))
    return _Scene(objects, *_relation_turn(objects[0], refs[0], relation, objects[1], refs[1]))


def _ask_compare_size(rng: np.random.Generator, config: SyntheticConfig) -> _Scene:
    ref = _pick(rng, ("shape", "color"))
    cells = _cells(rng, config.grid, _num_objects(rng, config, low=2))
    objects = _objects(rng, config, cells, named=[(0, ref), (1, ref)])
    large = int(rng.integers(2))
    for i in (0, 1):
        objects[i] = objects[i]._replace(size=SIZES[int(i == large)])
    comparison = _pick(rng, ("larger", "smaller"))
    return _Scene(objects, *_compare_turn(objects[0], objects[1], ref, comparison))


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
    return _Scene(objects, *_count_turn(objects, ref, value))


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
    return _Scene(objects, *_appear_turn(objects, frame, _pick(rng, ("shape", "color"))))


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
    return _Scene(objects, *_first_turn(a, b, ref))


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


# --- Conversations: several questions about one scene ------------------------------------------


class _Turn(NamedTuple):
    question: str
    answer: str
    mentioned: tuple[_Object, ...]  # the objects the question is about


_About = Callable[
    [np.random.Generator, "SyntheticConfig", Sequence[_Object], Sequence[_Object]], _Turn | None
]
"""``ask(rng, config, objects, subjects)``: a question about ``objects`` (a drawn scene of
``config``) whose subject is one of ``subjects`` (or, for two-object questions, at least one of
the pair is; a count of zero is about no object), or None when the scene offers none."""

_REFS = ("shape", "color")


def _unique(objects: Sequence[_Object], ref: str) -> list[_Object]:
    """The objects that a phrase of kind ``ref`` names unambiguously in ``objects``."""
    keys = collections.Counter(_key(ref, o.shape, o.color) for o in objects)
    return [o for o in objects if keys[_key(ref, o.shape, o.color)] == 1]


def _named(objects: Sequence[_Object]) -> dict[str, list[_Object]]:
    """Ref ("shape", "color") → the objects a phrase of that kind names unambiguously."""
    return {ref: _unique(objects, ref) for ref in _REFS}


def _pairs(
    objects: Sequence[_Object], subjects: Sequence[_Object], ok: Callable[[_Object, _Object], bool]
) -> list[tuple[_Object, _Object]]:
    """Pairs of distinct objects with ``ok(a, b)`` of which at least one is a subject."""
    return [
        (a, b)
        for a in objects
        for b in objects
        if a != b and (a in subjects or b in subjects) and ok(a, b)
    ]


def _about_attribute(attribute: str, ref: str) -> _About:
    def ask(rng, config, objects, subjects):
        options = [o for o in _unique(objects, ref) if o in subjects]
        if not options:
            return None
        obj = _pick(rng, options)
        return _Turn(*_attribute_turn(attribute, obj, ref), (obj,))

    return ask


def _about_order(rng, config, objects, subjects):
    if len(objects) < 2 or len({o.cell[1] for o in objects}) < len(objects):
        return None
    return _Turn(*_order_turn(objects, _pick(rng, _REFS)), tuple(objects))


def _about_relation(rng, config, objects, subjects):
    named = _named(objects)
    refs = {o: [r for r in _REFS if o in named[r]] for o in objects}
    pairs = _pairs(objects, subjects, lambda a, b: bool(refs[a] and refs[b]))
    if not pairs:
        return None
    a, b = _pick(rng, pairs)
    ref_a, ref_b = _pick(rng, refs[a]), _pick(rng, refs[b])
    relation = _pick(rng, [r for r, (axis, _) in RELATIONS.items() if a.cell[axis] != b.cell[axis]])
    return _Turn(*_relation_turn(a, ref_a, relation, b, ref_b), (a, b))


def _shared_refs(named: dict[str, list[_Object]], a: _Object, b: _Object) -> list[str]:
    return [r for r in _REFS if a in named[r] and b in named[r]]


def _about_named_pair(
    differ: Callable[[_Object, _Object], bool],
    ask: Callable[[np.random.Generator, _Object, _Object, str], tuple[str, str]],
) -> _About:
    """Questions ``ask(rng, a, b, ref)`` about two objects that ``differ``, both named by one
    kind of phrase ``ref``."""

    def about(rng, config, objects, subjects):
        named = _named(objects)
        pairs = _pairs(objects, subjects, lambda a, b: differ(a, b) and _shared_refs(named, a, b))
        if not pairs:
            return None
        a, b = _pick(rng, pairs)
        return _Turn(*ask(rng, a, b, _pick(rng, _shared_refs(named, a, b))), (a, b))

    return about


def _about_count(rng, config, objects, subjects):
    """How many objects have a shape or colour: a subject's, or one the scene lacks ("zero";
    about no object). The count is drawn uniformly from those on offer, then the question
    from those with that count, so scenes of mostly distinct objects do not make "one" nearly
    every answer."""
    offered: dict[int, set[tuple[str, str]]] = collections.defaultdict(set)
    for ref, values in (("shape", config.shapes), ("color", config.colors)):
        present = {_word(o, ref) for o in objects}
        offered[0].update((ref, value) for value in values if value not in present)
        for subject in subjects:
            value = _word(subject, ref)
            offered[sum(_word(o, ref) == value for o in objects)].add((ref, value))
    counts = sorted(n for n, questions in offered.items() if questions)
    ref, value = _pick(rng, sorted(offered[_pick(rng, counts)]))
    counted = tuple(o for o in objects if _word(o, ref) == value)
    return _Turn(*_count_turn(objects, ref, value), counted)


def _about_video_appear(rng, config, objects, subjects):
    options = [o for o in subjects if o.frame > 0]
    if not options:
        return None
    target = _pick(rng, options)
    return _Turn(*_appear_turn(objects, target.frame, _pick(rng, _REFS)), (target,))


_ABOUT: dict[str, _About] = {
    "color": _about_attribute("color", "shape"),
    "shape": _about_attribute("shape", "color"),
    "size": _about_attribute("size", "both"),
    "order": _about_order,
    "relation": _about_relation,
    "compare_size": _about_named_pair(
        lambda a, b: a.size != b.size,
        lambda rng, a, b, ref: _compare_turn(a, b, ref, _pick(rng, ("larger", "smaller"))),
    ),
    "count": _about_count,
    "video_appear": _about_video_appear,
    "video_order": _about_named_pair(
        lambda a, b: a.frame != b.frame, lambda rng, a, b, ref: _first_turn(a, b, ref)
    ),
}
"""Task name → a question of that task about a drawn scene (the conversations' turns)."""


def _conversation(
    rng: np.random.Generator,
    config: SyntheticConfig,
    first: str,
    later: Sequence[str],
    later_probs: np.ndarray,
) -> tuple[list[_Object], list[tuple[str, _Turn]]] | None:
    """A scene and ``config.turns`` (task, turn) pairs about it, or None if it offers too few.

    The scene is drawn first (an image of at least two objects, in distinct columns when the
    first task is order, or a clip for a video task), then the first question (task ``first``);
    each later turn's task is drawn from ``later`` (weights ``later_probs``, without repeats
    until one fits) about an object no earlier turn mentioned, and only when no task can be,
    about any object; a question is never asked twice.
    """
    if TASKS[first][0] == "video":
        cells, frames = _clip_layout(rng, config)
        objects = _objects(rng, config, cells, frames)
    elif first == "order":  # as its scene builder: in distinct columns
        n = _num_objects(rng, config, low=2, high=config.grid)
        objects = _objects(rng, config, _cells(rng, config.grid, n, axis=1, apart=n))
    else:
        objects = _objects(rng, config, _cells(rng, config.grid, _num_objects(rng, config, low=2)))
    turn = _ABOUT[first](rng, config, objects, objects)
    if turn is None:
        return None
    turns = [(first, turn)]
    mentioned = set(turn.mentioned)
    for _ in range(config.turns - 1):
        order = [later[i] for i in rng.choice(len(later), len(later), replace=False, p=later_probs)]
        asked = {t.question for _, t in turns}
        fresh = [o for o in objects if o not in mentioned]
        found = (fresh and _later_turn(rng, config, objects, fresh, order, asked)) or _later_turn(
            rng, config, objects, objects, order, asked
        )
        if found is None:
            return None
        turns.append(found)
        mentioned.update(found[1].mentioned)
    return objects, turns


def _later_turn(
    rng: np.random.Generator,
    config: SyntheticConfig,
    objects: Sequence[_Object],
    subjects: Sequence[_Object],
    tasks: Sequence[str],
    asked: set[str],
) -> tuple[str, _Turn] | None:
    """The first of ``tasks`` that asks a new question about one of ``subjects`` (each task
    drawn up to ``_DRAWS_PER_TASK`` times while it repeats a question)."""
    for task in tasks:
        for _ in range(_DRAWS_PER_TASK):
            turn = _ABOUT[task](rng, config, objects, subjects)
            if turn is None:
                break
            if turn.question not in asked:
                return task, turn
    return None


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
    - ``kind``: "image" | "video".
    - ``turns``: tuple of ``config.turns`` dicts ``{"question", "answer", "task", "family"}``:
      lower-case text, the answer one or a few words, ``task`` a name in ``TASKS``, ``family``
      its family. ``question``, ``answer``, ``task``, ``family``: the first turn's.
    - ``objects``: tuple of dicts ``{"shape", "color", "size", "bbox": (y0, x0, y1, x1) pixels,
      end-exclusive, "frame": index of the first frame it is in}``, in raster order of cells.
      Questions count frames from one: "the third frame" is frame 2.

    With ``config.turns`` = 1 the scene is drawn to fit its one question (so counts are uniform,
    named objects unique). With more, it is a conversation: a scene of at least two objects (or
    a clip) is drawn first, then the first turn's task (by ``tasks``) asks about it, and each
    later turn (tasks by ``later_tasks``, of the first's kind) asks about an object, or a frame's
    new object, that no earlier turn mentioned where the scene allows, else about any; some
    need two or more regions (order, relation, compare_size, count, video_order). No question
    is asked twice in a conversation.
    """

    def __init__(self, config: SyntheticConfig, split: str = "train", *, size: int):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.config = config
        self.split = split
        self._size = size
        self._tasks, self._probs = _weighted(config.tasks)
        self._later = {
            video: _weighted(
                {t: w for t, w in config.later_weights.items() if (TASKS[t][0] == "video") == video}
            )
            for video in (False, True)
        }

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"SyntheticVQA(split={self.split!r}, size={self._size}, config={self.config})"

    def _draw(self, rng: np.random.Generator, task: str) -> tuple[list, list] | None:
        """A scene's objects and its ``(task, question, answer)`` turns, or None (redraw)."""
        if self.config.turns == 1:
            scene = TASKS[task][1](rng, self.config)
            return scene.objects, [(task, scene.question, scene.answer)]
        later = self._later[TASKS[task][0] == "video"]
        drawn = _conversation(rng, self.config, task, *later)
        if drawn is None:
            return None
        objects, turns = drawn
        return objects, [(name, turn.question, turn.answer) for name, turn in turns]

    def _drawn(self, index: int) -> tuple[np.random.Generator, str, list, list]:
        """Example ``index``'s generator (where its pixels are drawn from next), first task,
        objects and ``(task, question, answer)`` turns."""
        index = operator.index(index)
        if not 0 <= index < self._size:
            raise IndexError(f"index {index} out of range for size {self._size}")
        split = SPLITS[self.split]
        rng = np.random.default_rng([self.config.seed, split, index])
        task = self._tasks[int(rng.choice(len(self._tasks), p=self._probs))]
        for _ in range(_MAX_DRAWS):
            drawn = self._draw(rng, task)
            if drawn is not None and _split_of(drawn[0]) == split:
                return rng, task, *drawn
        raise RuntimeError(
            f"no {self.split} scene for task {task!r} in {_MAX_DRAWS} draws: "
            "the config allows too few distinct scenes"
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng, task, objects, drawn_turns = self._drawn(index)
        objects = sorted(objects, key=lambda o: o.cell)
        video = TASKS[task][0] == "video"
        units, boxes = _render(rng, self.config, objects, self.config.video_frames if video else 1)
        turns = tuple(
            {"question": q, "answer": a, "task": t, "family": TASKS[t][0]}
            for t, q, a in drawn_turns
        )
        return {
            "units": units,
            "kind": "video" if video else "image",
            **turns[0],
            "turns": turns,
            "objects": tuple(
                {"shape": o.shape, "color": o.color, "size": o.size, "bbox": box, "frame": o.frame}
                for o, box in zip(objects, boxes, strict=True)
            ),
        }


def majority_answers(dataset: SyntheticVQA, examples: int) -> dict[str, str]:
    """Each task's most common answer over every turn of ``dataset``'s first ``examples``
    examples (their scenes and questions only, no pixels drawn; ties to the answer first seen):
    the answer prior, what a guess from the question's task alone gets."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for index in range(min(examples, len(dataset))):
        for task, _, answer in dataset._drawn(index)[3]:
            counts[task][answer] += 1
    return {task: counter.most_common(1)[0][0] for task, counter in counts.items()}


def _weighted(weights: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    """The tasks of positive weight, and their probabilities."""
    names = [name for name, weight in weights.items() if weight > 0]
    values = np.array([weights[name] for name in names], np.float64)
    return names, values / max(values.sum(), 1e-300)


def to_conversation(example: Mapping[str, Any]) -> dict[str, list[dict[str, str]]]:
    """The example's text as a LLaVA / Cambrian record, ``{"conversations": [human, gpt, ...]}``
    (a human and a gpt turn per question).

    One ``<image>`` placeholder, in the first human turn, stands for all the example's units,
    image or clip, as in Cambrian-S's video data: the loader expands it into
    ``example["units"]``, frame by frame.
    """
    conversations = []
    for index, turn in enumerate(example["turns"]):
        question = f"{IMAGE_TOKEN}\n{turn['question']}" if index == 0 else turn["question"]
        conversations += [
            {"from": "human", "value": question},
            {"from": "gpt", "value": turn["answer"]},
        ]
    return {"conversations": conversations}

"""The synthetic VQA set and the built-in tokenizer.

Answers are re-derived here from each example's object metadata (boxes, frames, attributes) and
the question text alone, and the metadata is checked against the pixels: so a test passing means
the question is answerable from the image and the answer is right.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
import time

import grain
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from gazejax.data import vocab
from gazejax.data.batches import synthetic_examples
from gazejax.data.packing import Text, pack_batch
from gazejax.data.synthetic import (
    COLORS,
    TASKS,
    SyntheticConfig,
    SyntheticVQA,
    majority_answers,
    to_conversation,
)
from gazejax.gaze.geometry import PackingGeometry

CONFIG = SyntheticConfig()
NUM_EXAMPLES = 300
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    source = SyntheticVQA(CONFIG, "train", size=10**6)
    return [source[i] for i in range(NUM_EXAMPLES)]


# --- Independent checks: answers from metadata, metadata from pixels --------------------------


def _center(obj: dict) -> tuple[float, float]:
    y0, x0, y1, x1 = obj["bbox"]
    return (y0 + y1) / 2, (x0 + x1) / 2


def _find(objects, phrase: str) -> dict:
    """The one object that "the circle" / "the red object" / "the red circle" fits."""
    words = tuple(phrase.removeprefix("the ").split())
    if words[-1] == "object":
        matches = [o for o in objects if o["color"] == words[0]]
    elif len(words) == 1:
        matches = [o for o in objects if o["shape"] == words[0]]
    else:
        matches = [o for o in objects if (o["color"], o["shape"]) == words]
    assert len(matches) == 1, f"{phrase!r} fits {len(matches)} objects"
    return matches[0]


def _name(obj: dict, phrase: str) -> str:
    """The word a one-word answer uses for ``obj``, in the style of ``phrase``."""
    return obj["color"] if phrase.endswith(" object") else obj["shape"]


def _separated(a: dict, b: dict, axis: int) -> bool:
    """Whether the boxes do not overlap when projected on ``axis`` (0: rows, 1: columns)."""
    return a["bbox"][axis + 2] <= b["bbox"][axis] or b["bbox"][axis + 2] <= a["bbox"][axis]


def derive(question: str, objects) -> tuple[str, list[dict]]:
    """The answer from the question and the object metadata, parsed and computed afresh, and
    the objects the question is about."""
    q = question
    if m := re.fullmatch(r"what (color|shape) is the object that appears in the (\w+) frame\?", q):
        (obj,) = [o for o in objects if o["frame"] == ORDINALS.index(m[2])]
        return obj[m[1]], [obj]
    if m := re.fullmatch(r"what (color|shape|size) is (the [a-z ]+)\?", q):
        obj = _find(objects, m[2])
        return obj[m[1]], [obj]
    if m := re.fullmatch(r"list the (shape|color)s from left to right\.", q):
        for a in objects:
            assert all(_separated(a, b, 1) for b in objects if b is not a)
        ordered = sorted(objects, key=lambda o: _center(o)[1])
        return " ".join(o[m[1]] for o in ordered), ordered
    if m := re.fullmatch(r"is (the [a-z ]+?) (left of|right of|above|below) (the [a-z ]+)\?", q):
        a, b = _find(objects, m[1]), _find(objects, m[3])
        axis = 1 if m[2] in ("left of", "right of") else 0
        assert _separated(a, b, axis)
        before = _center(a)[axis] < _center(b)[axis]
        return ("yes" if before == (m[2] in ("left of", "above")) else "no"), [a, b]
    if m := re.fullmatch(r"which is (larger|smaller), (the [a-z ]+) or (the [a-z ]+)\?", q):
        pair = [_find(objects, m[2]), _find(objects, m[3])]
        areas = [(o["bbox"][2] - o["bbox"][0]) * (o["bbox"][3] - o["bbox"][1]) for o in pair]
        assert areas[0] != areas[1]
        pick = int(areas[1] > areas[0]) if m[1] == "larger" else int(areas[1] < areas[0])
        return _name(pair[pick], m[2]), pair
    if m := re.fullmatch(r"how many (\w+) objects\?", q):
        counted = [o for o in objects if o["color"] == m[1]]
        return NUMBERS[len(counted)], counted
    if m := re.fullmatch(r"how many (\w+)\?", q):
        singular = re.sub(r"(?<=s)es$|s$", "", m[1])
        counted = [o for o in objects if o["shape"] == singular]
        return NUMBERS[len(counted)], counted
    if m := re.fullmatch(r"which came first, (the [a-z ]+) or (the [a-z ]+)\?", q):
        a, b = _find(objects, m[1]), _find(objects, m[2])
        assert a["frame"] != b["frame"]
        return _name(min(a, b, key=lambda o: o["frame"]), m[1]), [a, b]
    raise AssertionError(f"unparsed question {q!r}")


# Whether a shape covers its box's top-left corner, bottom-left corner and the point a quarter of
# the way in from the top-left: a signature that tells the four shapes apart from 5 px up.
SHAPE_PROBES = {
    (True, True, True): "square",
    (False, False, True): "circle",
    (False, True, False): "triangle",
    (False, False, False): "cross",
}


def _palette_name(rgb: np.ndarray) -> str:
    return min(COLORS, key=lambda name: np.linalg.norm(rgb - np.array(COLORS[name])))


def check_example(example: dict, config: SyntheticConfig) -> None:
    """Shapes, ranges, layout and pixels agree with the metadata; the answer is right."""
    units = example["units"]
    num_units = config.video_frames if example["kind"] == "video" else 1
    size, cell = config.image_size, config.image_size // config.grid
    assert units.dtype == np.float32 and units.shape == (num_units, size, size, 3)
    assert units.min() >= -1 and units.max() <= 1
    turns = example["turns"]
    assert len(turns) == config.turns
    assert {k: example[k] for k in ("question", "answer", "task", "family")} == turns[0]
    assert len({t["question"] for t in turns}) == len(turns)  # none asked twice
    for turn in turns:
        assert turn["task"] in TASKS and turn["family"] == TASKS[turn["task"]][0]
        assert (example["kind"] == "video") == (turn["family"] == "video")

    objects = example["objects"]
    initial = sum(o["frame"] == 0 for o in objects)
    # "order" needs objects in distinct columns, so it may hold fewer than min_objects.
    assert initial <= config.max_objects
    assert initial >= (
        min(config.min_objects, config.grid) if example["task"] == "order" else config.min_objects
    )
    cells = set()
    for o in objects:
        y0, x0, y1, x1 = o["bbox"]
        assert y1 - y0 == x1 - x0 == config.object_sides[o["size"]]
        row, col = y0 // cell, x0 // cell
        # Inside one cell, at least a pixel from its edges: objects never overlap or touch.
        assert y0 > row * cell and y1 < (row + 1) * cell
        assert x0 > col * cell and x1 < (col + 1) * cell
        cells.add((row, col))
    assert len(cells) == len(objects)
    if example["kind"] == "video":  # one new object in each frame after the first
        assert sorted(o["frame"] for o in objects if o["frame"]) == list(range(1, num_units))

    pixels = (units + 1) / 2
    outside = np.ones(units.shape[:3], bool)
    for o in objects:
        y0, x0, y1, x1 = o["bbox"]
        outside[:, y0:y1, x0:x1] = False
    background = np.median(pixels[outside], axis=0)
    assert np.abs(pixels[outside] - background).max() < 10 * config.noise + 1e-6
    for frame, image in enumerate(pixels):
        for o in objects:
            y0, x0, y1, x1 = o["bbox"]
            cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
            if frame < o["frame"]:  # not there yet
                assert np.abs(image[y0:y1, x0:x1] - background).max() < 10 * config.noise + 1e-6
                continue
            assert _palette_name(image[cy, cx]) == o["color"]
            color = np.array(COLORS[o["color"]])

            def on(y: int, x: int, image=image, color=color) -> bool:
                p = image[y, x]
                return np.linalg.norm(p - color) < np.linalg.norm(p - background)

            side = y1 - y0
            probes = (on(y0, x0), on(y1 - 1, x0), on(y0 + side // 4, x0 + side // 4))
            assert SHAPE_PROBES[probes] == o["shape"]
    for turn in turns:
        assert derive(turn["question"], objects)[0] == turn["answer"], turn["question"]


# --- The data set ------------------------------------------------------------------------------


def test_examples_are_consistent_and_answers_correct(examples):
    for example in examples:
        check_example(example, CONFIG)


def test_same_seed_and_index_give_the_same_example():
    a = SyntheticVQA(CONFIG, "train", size=100)
    b = SyntheticVQA(SyntheticConfig(), "train", size=5)  # the set's size plays no part
    for i in range(5):
        x, y = a[i], b[i]
        assert np.array_equal(x["units"], y["units"])
        assert {k: v for k, v in x.items() if k != "units"} == {
            k: v for k, v in y.items() if k != "units"
        }


def test_different_index_or_seed_gives_a_different_example():
    source = SyntheticVQA(CONFIG, "train", size=100)
    other_seed = SyntheticVQA(SyntheticConfig(seed=1), "train", size=100)
    for i in range(10):
        assert not np.array_equal(source[i]["units"], source[i + 1]["units"])
        assert not np.array_equal(source[i]["units"], other_seed[i]["units"])


def _scene(example: dict, config: SyntheticConfig) -> tuple:
    """The scene an example shows, from its metadata: attributes, cells and frames."""
    cell = config.image_size // config.grid
    return tuple(
        sorted(
            (
                o["frame"],
                o["bbox"][0] // cell,
                o["bbox"][1] // cell,
                o["shape"],
                o["color"],
                o["size"],
            )
            for o in example["objects"]
        )
    )


def _fingerprint(example: dict) -> str:
    text = (example["question"] + "\0" + example["answer"]).encode()
    return hashlib.sha256(text + example["units"].tobytes()).hexdigest()


@pytest.mark.parametrize(
    "config",
    [CONFIG, SyntheticConfig(min_objects=1, max_objects=1, tasks={"color": 1.0})],
    ids=["default", "one_object"],  # one object: 768 scenes, so an unsplit set would repeat
)
def test_train_and_eval_share_no_scene(config):
    train = SyntheticVQA(config, "train", size=400)
    eval_ = SyntheticVQA(config, "eval", size=400)
    train_examples = [train[i] for i in range(len(train))]
    eval_examples = [eval_[i] for i in range(len(eval_))]
    assert not {_scene(e, config) for e in train_examples} & {
        _scene(e, config) for e in eval_examples
    }
    assert not {_fingerprint(e) for e in train_examples} & {_fingerprint(e) for e in eval_examples}


def test_tasks_follow_their_weights():
    n = 900
    counts = collections.Counter(SyntheticVQA(CONFIG, size=n)[i]["task"] for i in range(n))
    assert set(counts) == set(TASKS)
    p = 1 / len(TASKS)
    for task in TASKS:
        assert abs(counts[task] - n * p) < 5 * np.sqrt(n * p * (1 - p)), counts

    weighted = SyntheticConfig(tasks={"color": 3.0, "count": 1.0, "order": 0.0})
    n = 400
    counts = collections.Counter(SyntheticVQA(weighted, size=n)[i]["task"] for i in range(n))
    assert set(counts) == {"color", "count"}
    assert abs(counts["color"] - 0.75 * n) < 5 * np.sqrt(n * 0.75 * 0.25), counts


def test_answers_are_not_dominated_by_one_value():
    source = SyntheticVQA(CONFIG, size=2000)
    answers = collections.defaultdict(collections.Counter)
    for i in range(len(source)):
        example = source[i]
        if example["task"] in ("relation", "count", "size"):
            answers[example["task"]][example["answer"]] += 1
    assert set(answers["relation"]) == {"yes", "no"}
    assert set(answers["count"]) == set(NUMBERS[: CONFIG.max_objects + 1])
    for counts in answers.values():
        assert max(counts.values()) < 0.6 * sum(counts.values()), counts


MULTI_TURN = SyntheticConfig(max_objects=4, turns=3)


def test_conversations_ask_later_turns_about_objects_not_yet_mentioned():
    """Three questions per scene: each later turn is about an object (a clip: a frame's new
    object) that no earlier turn mentioned, whenever the scene has one left; answers
    re-derived."""
    source = SyntheticVQA(MULTI_TURN, "train", size=10**6)
    multi_region = 0
    for i in range(150):
        example = source[i]
        check_example(example, MULTI_TURN)
        objects = example["objects"]
        mentioned: list[dict] = []
        for turn in example["turns"]:
            _, about = derive(turn["question"], objects)
            fresh = [o for o in objects if o not in mentioned]
            # An image's count question, a clip's "appears in frame n" can always ask about one;
            # a count of zero is about none.
            zero = turn["answer"] == "zero"
            if (
                mentioned
                and not zero
                and [o for o in fresh if example["kind"] == "image" or o["frame"]]
            ):
                assert any(o in fresh for o in about), (turn, mentioned)
            mentioned += about
            multi_region += turn["task"] in ("relation", "compare_size", "count", "order")
    assert multi_region > 100  # turns that need two or more regions


def test_conversation_counts_are_not_mostly_one():
    """A later turn's count is drawn over the counts the scene offers: "one" stays a minority
    with up to 4 objects (picking a subject first made it ~2/3 of the answers)."""
    config = dataclasses.replace(MULTI_TURN, tasks={"count": 1.0, "color": 1.0})
    source = SyntheticVQA(config, "train", size=400)
    counts = collections.Counter(
        t["answer"] for i in range(len(source)) for t in source[i]["turns"] if t["task"] == "count"
    )
    assert sum(counts.values()) > 300 and counts["one"] < 0.55 * sum(counts.values()), counts


def test_majority_answers_are_each_tasks_most_common_answer():
    """Drawn without pixels, the turns are the examples' own: the same majority per task."""
    source = SyntheticVQA(MULTI_TURN, "train", size=300)

    def majority(examples: int) -> dict[str, str]:
        answers = collections.defaultdict(collections.Counter)
        for i in range(examples):
            for turn in source[i]["turns"]:
                answers[turn["task"]][turn["answer"]] += 1
        return {task: counts.most_common(1)[0][0] for task, counts in answers.items()}

    assert majority_answers(source, 10**6) == majority(300) and len(majority(300)) == len(TASKS)
    assert majority_answers(source, 5) == majority(5) != majority(300)


def test_to_conversation_uses_one_image_placeholder(examples):
    video = next(e for e in examples if e["kind"] == "video")
    for example in (examples[0], video):
        assert to_conversation(example) == {
            "conversations": [
                {"from": "human", "value": "<image>\n" + example["question"]},
                {"from": "gpt", "value": example["answer"]},
            ]
        }


def test_is_a_grain_data_source():
    source = SyntheticVQA(CONFIG, "eval", size=8)
    dataset = grain.MapDataset.source(source).map(to_conversation)
    assert len(dataset) == 8
    assert dataset[3] == to_conversation(source[3])


def test_index_and_split_are_checked():
    source = SyntheticVQA(CONFIG, size=3)
    assert source[np.int64(2)]["question"] == source[2]["question"]
    with pytest.raises(IndexError):
        source[3]
    with pytest.raises(IndexError):
        source[-1]
    with pytest.raises(ValueError, match="split"):
        SyntheticVQA(CONFIG, "test", size=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(image_size=62), "multiple of grid"),
        (dict(object_sizes=(0.25, 0.75)), "5 <= small"),  # 4 px: shapes look alike
        (dict(object_sizes=(0.5, 1.0)), "large <= cell - 2"),  # would touch the cell's edge
        (dict(shapes=("square", "circle")), "shapes"),
        (dict(shapes=("square", "square", "circle", "cross")), "shapes"),
        (dict(colors=("red", "green", "orange")), "colors"),
        (dict(min_objects=3, max_objects=2), "min_objects"),
        (dict(max_objects=17), "max_objects"),
        (dict(tasks={"colour": 1.0}), "unknown tasks"),
        (dict(tasks={"color": 0.0}), "positive sum"),
        (dict(max_objects=1), "multi_region"),
        (dict(video_frames=1), "video_frames"),
        (dict(grid=3, image_size=48, max_objects=8), "video_frames"),  # 8 + 3 new > 9 cells
        (dict(noise=-0.1), "noise"),
        (dict(seed=-1), "seed"),
        (dict(turns=0), "turns"),
        (dict(turns=2, tasks={"color": 1.0}, later_tasks={"video_order": 1.0}), "image task"),
        (dict(later_tasks={"colour": 1.0}), "unknown later_tasks"),
    ],
)
def test_invalid_configs_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticConfig(**kwargs)


@st.composite
def configs(draw) -> SyntheticConfig:
    grid = draw(st.integers(2, 5))
    frames = draw(st.integers(2, min(5, grid * grid - 1)))
    max_objects = draw(st.integers(2, min(8, grid * grid - frames + 1)))
    return SyntheticConfig(
        image_size=grid * draw(st.integers(10, 16)),
        grid=grid,
        min_objects=draw(st.integers(1, max_objects)),
        max_objects=max_objects,
        video_frames=frames,
        noise=draw(st.sampled_from([0.0, 0.02])),
        turns=draw(st.sampled_from([1, 1, 2, 4])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@settings(max_examples=40, deadline=None)
@given(config=configs(), index=st.integers(0, 10**9), split=st.sampled_from(["train", "eval"]))
def test_generation_never_fails(config, index, split):
    check_example(SyntheticVQA(config, split, size=10**9 + 1)[index], config)


def test_generation_is_fast():
    source = SyntheticVQA(CONFIG, size=1000)
    start = time.perf_counter()
    for i in range(len(source)):
        source[i]
    seconds = time.perf_counter() - start
    print(f"\n1000 synthetic examples in {seconds:.2f} s ({seconds:.2f} ms / example)")
    assert seconds < 10


# --- The tokenizer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return vocab.build_tokenizer()


def _round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    assert tokenizer.token_to_id(vocab.UNK_TOKEN) not in ids, text
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_is_small_with_fixed_special_ids(tokenizer):
    assert tokenizer.get_vocab_size() < 200
    assert sorted(tokenizer.get_vocab().values()) == list(range(tokenizer.get_vocab_size()))
    for i, token in enumerate(vocab.SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i
    assert tokenizer.token_to_id("<|endoftext|>") == 0  # the pad


def test_every_question_and_answer_round_trips(tokenizer, examples):
    for example in examples:
        _round_trip(tokenizer, example["question"])
        _round_trip(tokenizer, example["answer"])


def test_chatml_round_trips_with_newlines(tokenizer, examples):
    example = next(e for e in examples if e["task"] == "order")
    human, gpt = to_conversation(example)["conversations"]
    text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{human['value']}<|im_end|>\n"
        f"<|im_start|>assistant\n{gpt['value']}<|im_end|>\n"
    )
    _round_trip(tokenizer, text)
    tokens = tokenizer.encode(text).tokens
    assert tokens[:3] == ["<|im_start|>", "system", "\n"]
    assert tokens.count("<image>") == 1 and tokens.count("\n") == 7
    _round_trip(tokenizer, "<video>\nframe 12, 3.")


def test_unknown_words_become_unk(tokenizer):
    assert tokenizer.encode("what zebra?").tokens == ["what", " ", "<unk>", "?"]


def test_save_writes_a_readable_tokenizer_json(tokenizer, tmp_path):
    path = vocab.save(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "tokenizer.json"
    loaded = Tokenizer.from_file(str(path))
    text = "<|im_start|>user\n<image>\nhow many red objects?<|im_end|>\n"
    assert loaded.encode(text).ids == tokenizer.encode(text).ids
    assert loaded.get_vocab() == tokenizer.get_vocab()


def test_without_jitter_objects_are_centred_in_their_cells():
    """``jitter=False`` (the default config's 96 px, 6 x 6 layout): every object's box is
    centred in its cell, so an object aligned with a 16 px patch always looks the same."""
    config = SyntheticConfig(image_size=96, grid=6, object_sizes=(0.6, 0.85), jitter=False)
    source = SyntheticVQA(config, "train", size=10**6)
    cell = config.image_size // config.grid
    for i in range(60):
        example = source[i]
        check_example(example, config)
        for obj in example["objects"]:
            y0, x0, y1, x1 = obj["bbox"]
            side = y1 - y0
            offset = (cell - side) // 2
            assert (y0 % cell, x0 % cell) == (offset, offset), obj


def test_every_turn_of_a_conversation_is_supervised(tokenizer):
    """Training on a 3-turn conversation: the loss mask (targets >= 0) covers exactly each
    turn's answer tokens and its closing <|im_end|>, after packing too."""
    fields = {k: v for k, v in dataclasses.asdict(MULTI_TURN).items() if k != "seed"}
    example = SyntheticVQA(MULTI_TURN, "train", size=10)[4]
    items, info = synthetic_examples(fields, "train", 0, tokenizer, "")(4)
    turns = tuple((t["task"], t["family"]) for t in example["turns"])
    answers = tuple(t["answer"] for t in example["turns"])
    want = {"task": example["task"], "family": example["family"], "turns": turns}
    assert info == {**want, "answers": answers}
    expected = []
    for turn in example["turns"]:
        expected += [*tokenizer.encode(turn["answer"]).tokens, "<|im_end|>"]
    targets = np.concatenate([x.targets for x in items if isinstance(x, Text)])
    assert [tokenizer.id_to_token(int(t)) for t in targets if t >= 0] == expected
    geometry = PackingGeometry((8, 8), (2, 2, 1), 0, 64)
    _, packed = pack_batch([items], geometry, length=512, max_units=4, num_regions=64)
    packed = np.asarray(packed[0])
    assert [tokenizer.id_to_token(int(t)) for t in packed if t >= 0] == expected

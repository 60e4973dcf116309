"""ConversationSource through grain: examples with their visuals, skips counted, hosts disjoint."""

from __future__ import annotations

import json
import pickle

import grain
import numpy as np
import pytest
from PIL import Image

from gazejax.data.packing import Text, Visual
from gazejax.data.records import DataError, Location
from gazejax.data.sources import (
    ConversationSource,
    check_length,
    host_dataset,
    skip_summary,
    to_items,
)
from gazejax.data.vocab import build_tokenizer
from gazejax.gaze.regions import TextSegment, VisualSegment, build_layout
from tests.test_images_video import frame_ids, write_clip

SIZE = 8  # image_size
TOKENIZER = build_tokenizer()


def turns(*values: str) -> list[dict[str, str]]:
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


RECORDS = [
    {"id": "red", "image": "red.png", "conversations": turns("<image>\nwhat color?", "red")},
    {
        "id": "two",
        "image": ["red.png", "sub/blue.jpg"],
        "conversations": turns("<image> left of <image>?", "yes"),
    },
    {"id": "clip", "video": "clip.mp4", "conversations": turns("<video>\nwhat?", "one")},
    {"id": "frames", "video": "frames", "conversations": turns("<image> how many?", "two")},
    {"id": "text", "conversations": turns("hi", "hello")},
]


@pytest.fixture
def root(tmp_path):
    """An image root with two images, a 3.5 s clip and a folder of five frames."""
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (12, 12), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (20, 10), (0, 0, 255)).save(tmp_path / "sub" / "blue.jpg", quality=95)
    write_clip(tmp_path / "clip.mp4", num_frames=35, rate=10)
    (tmp_path / "frames").mkdir()
    for i in range(5):
        Image.new("RGB", (10, 10), (6 * i,) * 3).save(tmp_path / "frames" / f"{i:03d}.png")
    return tmp_path


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_examples_carry_one_visual_per_placeholder(root, suffix):
    path = root / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(RECORDS))
    else:
        write_jsonl(path, RECORDS)
    source = ConversationSource(path, root, image_size=SIZE, max_frames=3)
    assert len(source) == 5
    red, two, clip, frames, text = (source[i] for i in range(5))
    assert red["id"] == "red" and red["conversations"] == RECORDS[0]["conversations"]
    assert [v.shape for v in red["visuals"]] == [(1, SIZE, SIZE, 3)]
    assert all(v.dtype == np.float32 for v in two["visuals"])
    np.testing.assert_allclose(red["visuals"][0][0, 4, 4], [1, -1, -1], atol=1e-6)
    blue = two["visuals"][1][0]
    assert blue[4, 4, 2] > 0.9 and blue[4, 4, 0] < -0.9  # the second image, padded
    assert [v.shape for v in clip["visuals"]] == [(3, SIZE, SIZE, 3)]  # 4 at 1 FPS -> 3
    assert frame_ids(clip["visuals"][0]) == [0, 20, 30]  # times 0, 2, 3 (1.5 rounds to 2)
    assert clip["conversations"][0]["value"] == "<image>\nwhat?"
    assert frame_ids(frames["visuals"][0]) == [0, 2, 4]
    assert text["visuals"] == []
    expected = f"{path}:3" if suffix == ".jsonl" else f"{path}[2]"
    assert str(clip["location"]) == expected


def test_video_root_is_separate_from_image_root(root, tmp_path_factory):
    videos = tmp_path_factory.mktemp("videos")
    write_clip(videos / "other.mp4", num_frames=10, rate=10)
    path = root / "data.jsonl"
    write_jsonl(path, [{"video": "other.mp4", "conversations": turns("<video>", "a")}])
    source = ConversationSource(path, root, video_root=videos, image_size=SIZE, max_frames=4)
    assert source[0]["visuals"][0].shape == (1, SIZE, SIZE, 3)


BAD = [  # (record, kind, what the message names)
    (
        {"id": "gone", "image": "missing.png", "conversations": turns("<image>", "a")},
        "image",
        "missing.png",
    ),
    (
        {"id": "junk", "image": "junk.jpg", "conversations": turns("<image>", "a")},
        "image",
        "junk.jpg",
    ),
    (
        {"id": "novid", "video": "nope.mp4", "conversations": turns("<video>", "a")},
        "video",
        "nope.mp4",
    ),
    (
        {"id": "count", "image": "red.png", "conversations": turns("no placeholder", "a")},
        "placeholder",
        "for 1 image",
    ),
]


@pytest.mark.parametrize("bad,kind,named", BAD)
def test_bad_samples_name_the_record_and_the_file(root, bad, kind, named):
    (root / "junk.jpg").write_bytes(b"garbage")
    path = root / "data.jsonl"
    write_jsonl(path, [RECORDS[0], bad])
    with pytest.raises(DataError) as info:
        ConversationSource(path, root, image_size=SIZE, max_frames=2)[1]
    error = info.value
    assert (error.path, error.line, error.kind) == (str(path), 2, kind)
    assert str(error).startswith(f"{path}:2: ") and named in str(error)


def test_skip_bad_samples_returns_none_and_counts_by_kind(root):
    (root / "junk.jpg").write_bytes(b"garbage")
    path = root / "data.jsonl"
    lines = [json.dumps(RECORDS[0]), "{not json", *(json.dumps(b) for b, _, _ in BAD)]
    path.write_text("\n".join(lines))
    source = ConversationSource(path, root, image_size=SIZE, max_frames=2, skip_bad_samples=True)
    assert source[0]["id"] == "red"
    assert [source[i] for i in range(1, len(source))] == [None] * 5
    assert source.skipped == {"json": 1, "image": 2, "video": 1, "placeholder": 1}
    assert skip_summary(source.skipped) == "5 skipped (image: 2, json: 1, placeholder: 1, video: 1)"
    assert [e["id"] for e in grain.MapDataset.source(source)] == ["red"]  # Nones dropped
    assert skip_summary({}) == "0 skipped"


def test_items_interleave_text_and_visuals_in_placeholder_order(root):
    path = root / "data.jsonl"
    write_jsonl(path, RECORDS)
    source = ConversationSource(path, root, image_size=SIZE, max_frames=3, tokenizer=TOKENIZER)
    two = source[1]
    assert [type(i) for i in two["items"]] == [Text, Visual, Text, Visual, Text]
    assert two["items"][1].frames is two["visuals"][0]
    assert two["items"][3].frames is two["visuals"][1]
    answer = [TOKENIZER.id_to_token(int(t)) for t in two["items"][-1].targets if t >= 0]
    assert answer == ["yes", "<|im_end|>"]
    clip_items = to_items(source[2], TOKENIZER)
    assert [len(i.frames) for i in clip_items if isinstance(i, Visual)] == [3]


def test_check_length_counts_the_slots_that_packing_lays_out(root):
    path = root / "data.jsonl"
    write_jsonl(path, RECORDS)
    example = ConversationSource(path, root, image_size=SIZE, max_frames=3)[2]  # 3 frames
    items = to_items(example, TOKENIZER)
    text = sum(len(i.ids) for i in items if isinstance(i, Text))
    grid, context = 4, 1  # a 2 x 2 unit grid with one context token
    segments = [
        TextSegment(len(i.ids))
        if isinstance(i, Text)
        else VisualSegment(2, 2, frames=len(i.frames))
        for i in items
    ]
    slots = build_layout(segments, (1, 1), context).length
    assert slots == text + 3 * (grid + context)
    check_length(items, example, max_length=slots, tokens_per_unit=grid + context, max_units=3)
    with pytest.raises(DataError, match="> max_length") as info:
        check_length(items, example, max_length=slots - 1, tokens_per_unit=grid + context)
    assert info.value.kind == "too_long" and info.value.line == 3 and "'clip'" in str(info.value)
    with pytest.raises(DataError, match="3 frame"):
        check_length(items, example, max_length=None, max_units=2)


def test_too_long_samples_are_skipped_and_counted(root):
    path = root / "data.jsonl"
    write_jsonl(path, [RECORDS[4], RECORDS[2]])
    source = ConversationSource(
        path,
        root,
        image_size=SIZE,
        max_frames=3,
        tokenizer=TOKENIZER,
        max_length=60,
        tokens_per_unit=20,
        skip_bad_samples=True,
    )
    assert source[0] is not None and source[1] is None
    assert source.skipped == {"too_long": 1}


def test_to_items_names_the_record_when_visuals_and_placeholders_differ():
    example = {
        "id": "x",
        "location": Location("d.jsonl", line=4),
        "conversations": turns("<image>", "a"),
        "visuals": [np.zeros((1, SIZE, SIZE, 3), np.float32)] * 2,
    }
    with pytest.raises(DataError, match=r"^d.jsonl:4: record 'x': 1 placeholder") as info:
        to_items(example, TOKENIZER)
    assert info.value.kind == "placeholder"


def test_setup_errors_are_value_errors_at_construction(root):
    write_jsonl(root / "data.jsonl", RECORDS)
    for kwargs in (
        {"image_size": 0, "max_frames": 1},
        {"image_size": 8, "max_frames": 0},
        {"image_size": 8, "max_frames": 1, "fps": 0},
    ):
        with pytest.raises(ValueError, match="need image_size"):
            ConversationSource(root / "data.jsonl", root, **kwargs)


def test_a_tokenizer_without_image_token_is_a_setup_error_not_a_data_error(root):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    plain = Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>"))
    example = {
        "id": "x",
        "location": None,
        "conversations": turns("<image>", "a"),
        "visuals": [np.zeros((1, SIZE, SIZE, 3), np.float32)],
    }
    with pytest.raises(ValueError, match="no '<image>' token") as info:
        to_items(example, plain)
    assert not isinstance(info.value, DataError)


# --- grain: shuffling, host shards, epochs ----------------------------------------------------


@pytest.fixture
def text_source(tmp_path):
    """Ten text-only records, ids 0..9 (fast: no visuals)."""
    path = tmp_path / "text.jsonl"
    write_jsonl(path, [{"id": i, "conversations": turns(f"q{i}", "a")} for i in range(10)])
    return ConversationSource(path, tmp_path, image_size=SIZE, max_frames=1)


def ids(dataset) -> list[int]:
    return [int(example["id"]) for example in dataset]


def test_shuffling_is_deterministic_by_seed_and_differs_across_seeds(text_source):
    kwargs = {"process_index": 0, "process_count": 1}
    first = ids(host_dataset(text_source, seed=3, **kwargs))
    assert first == ids(host_dataset(text_source, seed=3, **kwargs))
    assert sorted(first) == list(range(10)) and first != list(range(10))
    assert first != ids(host_dataset(text_source, seed=4, **kwargs))
    assert ids(host_dataset(text_source, seed=3, shuffle=False, **kwargs)) == list(range(10))


def test_host_shards_are_disjoint_and_cover_every_record(text_source):
    shards = [
        ids(host_dataset(text_source, seed=0, process_index=p, process_count=3)) for p in range(3)
    ]
    assert [len(s) for s in shards] == [4, 3, 3]
    assert sorted(sum(shards, [])) == list(range(10))
    even = [
        ids(
            host_dataset(text_source, seed=0, process_index=p, process_count=3, drop_remainder=True)
        )
        for p in range(3)
    ]
    assert [len(s) for s in even] == [3, 3, 3] and len(set(sum(even, []))) == 9
    with pytest.raises(ValueError, match="process_index"):
        host_dataset(text_source, seed=0, process_index=3, process_count=3)


def test_epochs_reshuffle_and_each_covers_the_shard(text_source):
    dataset = host_dataset(text_source, seed=1, num_epochs=3, process_index=1, process_count=2)
    order = ids(dataset)
    epochs = [order[i : i + 5] for i in range(0, 15, 5)]
    assert all(sorted(e) == [1, 3, 5, 7, 9] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    forever = host_dataset(text_source, seed=1, num_epochs=None, process_index=1, process_count=2)
    assert [int(forever[i]["id"]) for i in range(15)] == order


def test_source_pickles_for_worker_processes(root):
    path = root / "data.jsonl"
    write_jsonl(path, RECORDS)
    source = ConversationSource(path, root, image_size=SIZE, max_frames=3, tokenizer=TOKENIZER)
    copy = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(copy[1]["visuals"][1], source[1]["visuals"][1])

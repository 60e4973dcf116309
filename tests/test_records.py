"""LLaVA / Cambrian JSON and JSONL records: random access, and every bad record named by line."""

from __future__ import annotations

import json
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gazejax.data.records import DataError, RecordFile


def turns(*values: str) -> list[dict[str, str]]:
    """Alternating human / gpt turns with these values."""
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


GOOD = [
    {"id": "one", "image": "a.jpg", "conversations": turns("<image>\nwhat?", "red")},
    {
        "id": 2,
        "image": ["a.jpg", "b.png"],
        "conversations": turns("<image> and <image>", "same", "again?", "no"),
    },
    {"id": "clip", "video": "clip.mp4", "conversations": turns("<video>\nwhat came first?", "x")},
    {"id": "frames", "video": "frames/", "conversations": turns("<image> what?", "y")},
    {"conversations": turns("text only", "ok")},
]


def write_jsonl(path, lines: list) -> None:
    """Each entry a record (dumped) or a raw string, one per line."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def test_jsonl_reads_records_at_their_lines_and_skips_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [GOOD[0], "", "  \t", GOOD[1], GOOD[2], GOOD[3], GOOD[4]])
    records = RecordFile(path)
    assert len(records) == 5
    assert [str(records.location(i)) for i in range(5)] == [f"{path}:{n}" for n in (1, 4, 5, 6, 7)]
    first, two, clip, frames, text = (records[i] for i in range(5))
    assert (first.id, first.images, first.video) == ("one", ("a.jpg",), None)
    assert (two.id, two.images) == ("2", ("a.jpg", "b.png"))
    assert (clip.images, clip.video) == ((), "clip.mp4")
    assert clip.conversations[0]["value"] == "<image>\nwhat came first?"  # <video> normalised
    assert frames.video == "frames/"
    assert text.id == f"{path}:7" and text.images == () and text.video is None
    assert records[3].conversations == GOOD[3]["conversations"]  # random access, any order


def test_jsonl_reads_crlf_and_a_last_line_without_newline(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode() + b"\r\n" + json.dumps(GOOD[4]).encode())
    records = RecordFile(path)
    assert [records[i].conversations for i in range(2)] == [
        GOOD[0]["conversations"],
        GOOD[4]["conversations"],
    ]


def test_json_list_reads_the_same_records(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(GOOD, indent=1))
    records = RecordFile(path)
    assert len(records) == len(GOOD)
    assert [records[i].images for i in range(len(GOOD))] == [
        ("a.jpg",),
        ("a.jpg", "b.png"),
        (),
        (),
        (),
    ]
    assert str(records.location(2)) == f"{path}[2]"
    with pytest.raises(IndexError):
        records[len(GOOD)]


BAD = [  # (line, kind, message fragment)
    ('{"id": 1, "conversations": [', "json", "malformed JSON"),
    ([1, 2], "record", "not a JSON object"),
    ({"id": 1, "image": "a.jpg"}, "record", "missing 'conversations'"),
    ({"conversations": "hi"}, "record", "'conversations' is not a list"),
    ({"image": 3, "conversations": turns("<image>", "x")}, "record", "'image' is neither"),
    (
        {"image": ["a.jpg", 7], "conversations": turns("<image><image>", "x")},
        "record",
        "'image' is neither",
    ),
    ({"video": ["a.mp4"], "conversations": turns("<video>", "x")}, "record", "'video' is not"),
    (
        {"image": "a.jpg", "video": "b.mp4", "conversations": turns("<image>", "x")},
        "record",
        "not both",
    ),
    (
        {"image": ["a.jpg", "b.jpg"], "conversations": turns("<image> one", "x")},
        "placeholder",
        "1 <image> and 0 <video> placeholder(s) for 2 image(s)",
    ),
    ({"conversations": turns("<image> where?", "x")}, "placeholder", "for 0 image(s)"),
    ({"image": "a.jpg", "conversations": turns("<video>", "x")}, "placeholder", "1 <video>"),
    (
        {"video": "a.mp4", "conversations": turns("<video> <image>", "x")},
        "placeholder",
        "2 placeholder(s)",
    ),
    (
        {"video": "a.mp4", "conversations": turns("no placeholder", "x")},
        "placeholder",
        "0 placeholder(s)",
    ),
    (
        {"image": "a.jpg", "conversations": turns("q", "<image>")},
        "placeholder",
        "assistant (gpt) turn",
    ),
    ({"image": "a.jpg", "conversations": turns("<image> q")}, "conversation", "no assistant"),
    ({"conversations": [{"from": "gpt", "value": "a"}]}, "conversation", "expected 'human'"),
]


@pytest.mark.parametrize("bad,kind,message", BAD)
def test_each_bad_jsonl_line_is_named_by_file_and_line(tmp_path, bad, kind, message):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [GOOD[0], "", bad, GOOD[1]])
    records = RecordFile(path)
    assert records[0].id == "one" and records[2].id == "2"  # the others still read
    with pytest.raises(DataError) as info:
        records[1]
    error = info.value
    assert (error.path, error.line, error.kind) == (str(path), 3, kind)
    assert str(error).startswith(f"{path}:3: ") and message in str(error)


@pytest.mark.parametrize("bad,kind,message", BAD[1:])
def test_each_bad_json_record_is_named_by_file_and_index(tmp_path, bad, kind, message):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD[0], bad]))
    with pytest.raises(DataError) as info:
        RecordFile(path)[1]
    error = info.value
    assert (error.path, error.line, error.index, error.kind) == (str(path), None, 1, kind)
    assert str(error).startswith(f"{path}[1]: ") and message in str(error)


@pytest.mark.parametrize(
    "name,content,message,line",
    [
        ("data.json", '[\n{"id": 1},\n{"id": \n', "malformed JSON", 4),
        ("data.json", '{"id": 1}', "must hold a list", None),
        ("data.json", b"[\xff]", "malformed JSON", None),
        ("data.csv", "a,b", "expected a .json or .jsonl", None),
    ],
)
def test_bad_files_are_named(tmp_path, name, content, message, line):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        RecordFile(path)
    assert info.value.path == str(path) and info.value.line == line


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="cannot read") as info:
        RecordFile(tmp_path / "nope.jsonl")
    assert info.value.path == str(tmp_path / "nope.jsonl") and info.value.kind == "file"


def test_data_error_pickles_whole():
    error = DataError("bad", "f.jsonl", 3, None, "image")
    back = pickle.loads(pickle.dumps(error))
    assert (str(back), back.path, back.line, back.index, back.kind, back.reason) == (
        "f.jsonl:3: bad",
        "f.jsonl",
        3,
        None,
        "image",
        "bad",
    )


# --- Property: any line reads as a record or raises DataError, never anything else ------------

_TEXT = st.text(
    st.characters(blacklist_characters="<\n\r", blacklist_categories=("Cs",)), max_size=12
)
_RECORDS = st.builds(
    lambda q, a, n: {
        "id": q,
        "image": [f"{i}.jpg" for i in range(n)],
        "conversations": turns("<image>" * n + q, a),
    },
    _TEXT,
    _TEXT,
    st.integers(0, 3),
)
_LINES = st.one_of(
    st.tuples(st.just("good"), _RECORDS),
    st.tuples(st.just("cut"), st.tuples(_RECORDS, st.floats(0, 1, exclude_max=True))),
    st.tuples(st.just("bytes"), st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))),
    st.tuples(st.just("text"), st.text(max_size=40).map(lambda s: s.replace("\n", ""))),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(_LINES, max_size=8))
def test_jsonl_reader_never_fails_but_with_data_error(tmp_path, lines):
    raw, expected = [], []  # expected: (line number, record or None) for non-blank lines
    for number, (kind, value) in enumerate(lines, start=1):
        if kind == "good":
            line = json.dumps(value).encode()
        elif kind == "cut":
            record, fraction = value
            full = json.dumps(record).encode()
            line = full[: int(len(full) * fraction)]
        else:
            line = value if kind == "bytes" else value.encode()
        raw.append(line)
        if line.strip(b" \t\r"):
            expected.append((number, value if kind == "good" else None, kind))
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(raw))
    records = RecordFile(path)
    assert len(records) == len(expected)
    for i, (number, record, kind) in enumerate(expected):
        assert records.location(i).line == number
        try:
            parsed = records[i]
        except DataError as error:
            assert kind != "good" and (error.path, error.line) == (str(path), number)
            continue
        assert kind != "cut", "a truncated record parsed"
        if kind == "good":
            assert parsed.conversations == record["conversations"]
            assert parsed.images == tuple(record["image"]) and parsed.id == record["id"]

r"""Benchmark ``jsonl:PATH[:NAME]`` (NAME: default the file's stem): a generic JSONL file, one
question a line: ``{"question": str, "image": str | [str] (optional), "video": str (a file or a
folder of frames, optional), "options": [str] (optional), "answer": str, "id": optional}``.
Images are read relative to ``--image-root`` (default: the file's folder), videos relative to
``--video-root`` (default: the image root), sampled as in training (``--max-frames``, default
the workdir's, at ``--fps``). The prompt is the training template with the question as the user
turn, after one ``<image>\n`` per image (one for the video) unless the question has its own
placeholders; logged in ``results.json``. Every method scores it the same way, from the same
teacher-forced forward (:mod:`gazejax.eval.scoring`):

- multiple choice (``options`` present), metric ``option_loglik_accuracy``: one sequence per
  option, the option's text as the whole assistant answer (options are not listed in the
  prompt); an option's score is the summed log-probability of its tokens and the closing
  ``<|im_end|>`` (so a prefix of another option is not favoured); correct when the best option
  (the first on ties) is the answer, given as an option's text or its letter (``B``, ``B.``,
  ``(B)``). Option rows are packed like any sequence: one compilation per bucket shape,
  whatever the number of options.
- open-ended (no options), metric ``exact_match``: the teacher-forced exact match (every answer
  token and ``<|im_end|>`` the argmax), not free generation.

A file with both kinds gives two records per method (one per metric); each record carries
``per_example`` (id, line, correct; for multiple choice the chosen letter and every option's
log-likelihood) and ``by_family`` by visual kind (image, video, text, ``Nimages``). A bad line
raises :class:`~gazejax.data.records.DataError` naming the file and line before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np

from gazejax.data.images import read_image
from gazejax.data.packing import Text
from gazejax.data.pipeline import example_items
from gazejax.data.records import DataError, Location, parse_visual_paths
from gazejax.data.video import read_video
from gazejax.data.vocab import IMAGE_TOKEN, UNK_TOKEN, VIDEO_TOKEN
from gazejax.eval.benchmarks.base import Benchmark, LoadOptions
from gazejax.eval.examples import Example
from gazejax.eval.methods.base import Runner
from gazejax.eval.scoring import record
from gazejax.inference.checkpoints import Checkpoint

USAGE = "jsonl:PATH[:NAME]"
JSONL_KEYS = ("question", "image", "video", "options", "answer", "id")
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
JSONL_PROMPT = (
    "ChatML (the training template, the checkpoint's system prompt); the user turn is the "
    "question as written, after one '<image>\\n' per image (or one for the video) unless it "
    "has its own <image>/<video> placeholders; the assistant turn is the scored answer"
)
JSONL_SCORING = {
    "option_loglik_accuracy": (
        "multiple choice (options present): one teacher-forced forward per option, the option's "
        "text as the whole assistant answer; its score is the summed log-probability of the "
        "option's tokens and the closing <|im_end|>; correct when the highest-scoring option "
        "(first on ties) is the answer (the answer is an option's text or its letter A, B, ...). "
        "Options are not listed in the prompt."
    ),
    "exact_match": (
        "open-ended (no options): teacher-forced argmax of every answer token and the closing "
        "<|im_end|> (as the synthetic benchmark); not free generation"
    ),
}


@dataclasses.dataclass(frozen=True)
class JsonlSpec:
    """A ``jsonl:PATH[:NAME]`` benchmark (NAME: default the file's stem)."""

    path: str
    name: str

    @classmethod
    def parse(cls, text: str) -> JsonlSpec:
        if not text.startswith("jsonl:") or len(text) == len("jsonl:"):
            raise ValueError(f"a JSONL benchmark is jsonl:PATH[:NAME], got {text!r}")
        rest = text[len("jsonl:") :]
        head, sep, name = rest.rpartition(":")
        if sep and name and "/" not in name and head.endswith((".jsonl", ".json")):
            return cls(head, name)
        return cls(rest, pathlib.Path(rest).stem)


@dataclasses.dataclass(frozen=True)
class JsonlQuestion:
    """A validated line: its location, id, question, visual paths, options and answer (the
    option index for multiple choice, else the text)."""

    location: Location
    id: str
    question: str
    images: tuple[str, ...]
    video: str | None
    options: tuple[str, ...] | None
    answer: str | int


def parse_jsonl_line(value, where: Location) -> JsonlQuestion:
    """Validates one decoded line of a JSONL benchmark (see :func:`jsonl_benchmark`).

    Raises:
      DataError: at ``where`` (file and line), saying what is wrong.
    """
    error = where.error
    if not isinstance(value, dict):
        raise error(f"a line is a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(JSONL_KEYS))
    if unknown:
        raise error(f"unknown key(s) {unknown}; known: {', '.join(JSONL_KEYS)}")
    question = value.get("question")
    if not isinstance(question, str) or not question.strip():
        raise error(f"'question' is not a non-empty string: {question!r}")
    answer = value.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise error(f"'answer' is not a non-empty string: {answer!r}")
    images, video = parse_visual_paths(value, where)
    visuals = 1 if video is not None else len(images)
    placeholders = question.count(IMAGE_TOKEN) + question.count(VIDEO_TOKEN)
    if placeholders and placeholders != visuals:
        raise error(
            f"{placeholders} {IMAGE_TOKEN}/{VIDEO_TOKEN} placeholder(s) in the question for "
            f"{visuals} image(s)/video(s)",
            "placeholder",
        )
    options = value.get("options")
    if options is not None:
        if (
            not isinstance(options, list)
            or not all(isinstance(o, str) and o.strip() for o in options)
            or not 2 <= len(options) <= len(OPTION_LETTERS)
        ):
            raise error(f"'options' is not a list of 2 to 26 non-empty strings: {options!r}")
        stripped = [o.strip() for o in options]
        if len(set(stripped)) != len(stripped):
            raise error(f"duplicate options: {options!r}")
        letter = re.fullmatch(r"\(?([A-Za-z])[.)]?", answer.strip())
        if answer.strip() in stripped:
            answer = stripped.index(answer.strip())
        elif letter and OPTION_LETTERS.index(letter[1].upper()) < len(options):
            answer = OPTION_LETTERS.index(letter[1].upper())
        else:
            raise error(
                f"answer {answer!r} is neither an option's text nor a letter "
                f"A-{OPTION_LETTERS[len(options) - 1]}"
            )
        options = tuple(options)
    return JsonlQuestion(
        location=where,
        id=str(value.get("id", f"{pathlib.Path(where.path).name}:{where.line}")),
        question=question,
        images=tuple(images),
        video=video,
        options=options,
        answer=answer,
    )


def read_jsonl_questions(path: str | pathlib.Path, limit: int | None = None) -> list:
    """The validated lines of a JSONL benchmark (blank lines skipped; the first ``limit``).

    Raises:
      DataError: the file is unreadable, or a line is malformed (naming the file and line).
    """
    path = pathlib.Path(path)
    if path.suffix != ".jsonl":
        raise DataError("a JSONL benchmark is a .jsonl file", path, kind="file")
    out = []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                if limit is not None and len(out) >= limit:
                    break
                where = Location(str(path), line=number)
                try:
                    value = json.loads(raw)
                except (ValueError, RecursionError) as exc:
                    raise where.error(f"malformed JSON: {exc}", "json") from exc
                out.append(parse_jsonl_line(value, where))
    except OSError as exc:
        raise DataError(f"cannot read: {exc}", path, kind="file") from exc
    if not out:
        raise DataError("no questions in the file", path, kind="file")
    return out


def jsonl_benchmark(
    spec: JsonlSpec,
    checkpoint: Checkpoint,
    image_root: str | None = None,
    video_root: str | None = None,
    max_frames: int | None = None,
    fps: float = 1.0,
    limit: int | None = None,
) -> tuple[list[Example], list[JsonlQuestion], dict]:
    """A generic JSONL benchmark: one Example per open-ended question, one per option of a
    multiple-choice question (see ``JSONL_PROMPT`` and ``JSONL_SCORING``).

    Each line: ``{"question": str, "image": str | [str] (optional), "video": str (a file or a
    folder of frames, optional), "options": [str] (optional), "answer": str, "id": optional}``.
    Image paths are relative to ``image_root`` (default: the file's folder), videos to
    ``video_root`` (default: ``image_root``); absolute paths are used as they are.

    Raises:
      DataError: a bad line, or a missing / unreadable image or video (naming the line).
    """
    questions = read_jsonl_questions(spec.path, limit)
    image_root = pathlib.Path(image_root or pathlib.Path(spec.path).parent)
    video_root = pathlib.Path(video_root) if video_root else image_root
    max_frames = int(checkpoint.max_frames if max_frames is None else max_frames)
    image_size = checkpoint.config.vit.image_size
    tokenizer, system_prompt = checkpoint.tokenizer, checkpoint.system_prompt
    unk = tokenizer.token_to_id(UNK_TOKEN)
    out, unknown = [], 0
    for index, q in enumerate(questions):
        try:
            if q.video is not None:
                frames, _ = read_video(
                    video_root / q.video, image_size=image_size, max_frames=max_frames, fps=fps
                )
                visuals = [frames]
            else:
                visuals = [read_image(image_root / p, image_size)[None] for p in q.images]
        except DataError as error:  # name the line that asked for the image or video
            raise q.location.error(f"id {q.id!r}: {error}", error.kind) from error
        question = q.question.replace(VIDEO_TOKEN, IMAGE_TOKEN)
        if IMAGE_TOKEN not in question:
            question = f"{IMAGE_TOKEN}\n" * len(visuals) + question
        answers = [q.answer] if q.options is None else list(q.options)
        if q.video is not None:
            bucket = "video"
        else:
            bucket = (
                ("text", "image")[len(visuals)] if len(visuals) < 2 else f"{len(visuals)}images"
            )
        task = "open_ended" if q.options is None else "multiple_choice"
        has_unknown = False
        for option, answer in enumerate(answers):
            conversation = [
                {"from": "human", "value": question},
                {"from": "gpt", "value": answer},
            ]
            items = example_items(conversation, visuals, tokenizer, IMAGE_TOKEN, system_prompt)
            has_unknown |= any(
                unk is not None and (x.ids == unk).any() for x in items if isinstance(x, Text)
            )
            option = -1 if q.options is None else option
            out.append(Example(items, task, bucket, bucket, index, option))
        unknown += has_unknown
    info = {
        "path": os.path.abspath(spec.path),
        "image_root": os.path.abspath(image_root),
        "video_root": os.path.abspath(video_root),
        "max_frames": max_frames,
        "fps": fps,
        "questions": len(questions),
        "multiple_choice": sum(q.options is not None for q in questions),
        "open_ended": sum(q.options is None for q in questions),
        "system_prompt": system_prompt,
        "template": JSONL_PROMPT,
        "scoring": {
            k: v
            for k, v in JSONL_SCORING.items()
            if any((q.options is not None) == (k == "option_loglik_accuracy") for q in questions)
        },
        "questions_with_unknown_tokens": unknown,
    }
    return out, questions, info


def jsonl_records(
    runner: Runner, results: dict, benchmark: str, questions: Sequence[JsonlQuestion]
) -> list[dict]:
    """The results.json records of a JSONL benchmark: one per metric present
    (``option_loglik_accuracy`` over the multiple-choice questions, ``exact_match`` over the
    open-ended ones), each with ``per_example`` (id, line, correct; choice and option
    log-likelihoods for multiple choice)."""
    rows: dict[int, list[int]] = {}
    for row, group in enumerate(results["group"]):
        rows.setdefault(group, []).append(row)
    out = []
    for metric in ("option_loglik_accuracy", "exact_match"):
        choice = metric == "option_loglik_accuracy"
        groups = [g for g in sorted(rows) if (questions[g].options is not None) == choice]
        if not groups:
            continue
        keys = ("task", "family", "turn", "visual_kv", "context_kv", "dense_kv")
        sub = {k: [] for k in ("exact", *keys)}
        per_example = []
        for g in groups:
            q = questions[g]
            first = rows[g][0]
            entry = {"id": q.id, "line": q.location.line}
            if choice:
                by_option = {results["option"][r]: results["loglik"][r] for r in rows[g]}
                logliks = [by_option[o] for o in range(len(q.options))]
                chosen = int(np.argmax(logliks))
                correct = chosen == q.answer
                entry.update(correct=correct, choice=OPTION_LETTERS[chosen], logliks=logliks)
            else:
                correct = bool(results["exact"][first])
                entry.update(correct=correct, loglik=results["loglik"][first])
            per_example.append(entry)
            sub["exact"].append(correct)
            for key in keys:
                sub[key].append(results[key][first])
        sub["seconds"], sub["top_k"] = results["seconds"], results["top_k"]
        r = record(runner, sub, benchmark)
        r["metric"] = metric
        del r["by_task"]
        r["per_example"] = per_example
        out.append(r)
    return out


@dataclasses.dataclass(frozen=True)
class JsonlBenchmark(Benchmark):
    """A loaded JSONL benchmark; its questions group the option rows into records."""

    questions: tuple[JsonlQuestion, ...] = ()

    def records(self, runner: Runner, results: dict) -> list[dict]:
        return jsonl_records(runner, results, self.name, self.questions)


def load(spec: str, options: LoadOptions) -> JsonlBenchmark:
    """``jsonl:PATH[:NAME]``: every line of the file (or the first ``options.jsonl_limit``)."""
    parsed = JsonlSpec.parse(spec)
    examples, questions, info = jsonl_benchmark(
        parsed,
        options.checkpoint,
        options.image_root,
        options.video_root,
        options.max_frames,
        options.fps,
        options.jsonl_limit,
    )
    return JsonlBenchmark(parsed.name, examples, info, tuple(questions))

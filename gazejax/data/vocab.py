"""The built-in word-level tokenizer: the synthetic set's words, ChatML's specials, no download.

A ``tokenizers.Tokenizer`` with a WordLevel model over a fixed, ordered word list (add new words
at its very end, so that existing ids stay stable). The pre-tokenizer cuts text into
letter runs, single digits, single whitespace characters and single punctuation marks, each its
own token; the decoder concatenates tokens. So spaces and ``"\\n"`` are tokens, and any text made
of known pieces round-trips exactly: ``decode(encode(s).ids, skip_special_tokens=False) == s``.
Words are case-sensitive; anything unknown becomes ``<unk>``.
"""

from __future__ import annotations

import os

from etils import epath
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel

from gazejax.paths import as_path

PAD_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, IM_START_TOKEN, IM_END_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN)

_WHITESPACE = (" ", "\n")
_PUNCTUATION = tuple(".,?!:;'\"-()/")
_DIGITS = tuple("0123456789")


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


NUMBER_WORDS = _words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
)
ORDINALS = _words("first second third fourth fifth sixth seventh eighth ninth tenth")
_ATTRIBUTES = _words(
    "square circle triangle cross squares circles triangles crosses "
    "red green blue yellow white purple small large"
)
_QUESTION_WORDS = _words(
    "what which how many is the a of or to from in that list color colors shape shapes size "
    "object objects left right above below larger smaller appears came frame yes no"
)
# ChatML roles and the default system prompt "You are a helpful assistant."
_CHAT_WORDS = _words("system user assistant You are helpful")

_PIECES = Regex(r"[A-Za-z]+|\d|\s|[^A-Za-z\d\s]")


def vocabulary() -> dict[str, int]:
    """Token → id: specials first (``<|endoftext|>`` = 0, the pad), then the fixed word list."""
    tokens = [
        *SPECIAL_TOKENS,
        *_WHITESPACE,
        *_PUNCTUATION,
        *_DIGITS,
        *NUMBER_WORDS,
        *ORDINALS,
        *_ATTRIBUTES,
        *_QUESTION_WORDS,
        *_CHAT_WORDS,
    ]
    return {token: i for i, token in enumerate(tokens)}


def build_tokenizer() -> Tokenizer:
    """The built-in tokenizer; special tokens are never split and keep their ids."""
    tokenizer = Tokenizer(WordLevel(vocabulary(), unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(_PIECES, behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def save(directory: str | os.PathLike) -> epath.Path:
    """Writes the built-in tokenizer to ``directory/tokenizer.json`` (as in an HF checkpoint;
    local or cloud).

    Returns the file's path; :func:`load_tokenizer` reads it back.
    """
    path = as_path(directory) / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_tokenizer().to_str(pretty=True))
    return path


VISUAL_PLACEHOLDERS = (IMAGE_TOKEN, VIDEO_TOKEN)


def add_visual_placeholders(tokenizer: Tokenizer) -> list[str]:
    """Adds ``<image>`` and ``<video>`` as special tokens where ``tokenizer`` lacks them (a stock
    Qwen ``tokenizer.json``); returns those added. New ids follow the existing ones
    (``get_vocab_size()`` before, in this order), so every load adds them at the same ids."""
    missing = [token for token in VISUAL_PLACEHOLDERS if tokenizer.token_to_id(token) is None]
    tokenizer.add_special_tokens(missing)
    return missing


def load_tokenizer(path: str | None) -> Tokenizer:
    """The tokenizer of a data config: ``path``'s ``tokenizer.json`` (Hugging Face format) with
    ``<image>`` / ``<video>`` added where missing (:func:`add_visual_placeholders`), or the
    built-in one (:func:`build_tokenizer`, the synthetic set's) when ``path`` is None.

    Raises:
      DataError: naming ``path`` when it does not load.
    """
    from gazejax.data.records import DataError  # records imports this module

    if path is None:
        return build_tokenizer()
    try:
        tokenizer = Tokenizer.from_str(as_path(path).read_text())
    except Exception as error:  # tokenizers raises a bare Exception
        raise DataError(f"cannot load the tokenizer: {error}", path, kind="file") from error
    add_visual_placeholders(tokenizer)
    return tokenizer

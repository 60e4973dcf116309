"""A stock tokenizer (Qwen's ``tokenizer.json`` has no ``<image>`` / ``<video>``) gains both as
special tokens when loaded, at stable ids after its own."""

from __future__ import annotations

from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel

from gazejax.data.vocab import IMAGE_TOKEN, VIDEO_TOKEN, load_tokenizer


def _stock_tokenizer(path) -> str:
    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "what", "is", "this", "?"]
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.save(str(path))
    return str(path)


def test_a_stock_tokenizer_gains_the_placeholders_as_special_tokens(tmp_path):
    path = _stock_tokenizer(tmp_path / "tokenizer.json")
    assert Tokenizer.from_file(path).token_to_id(IMAGE_TOKEN) is None
    tokenizer = load_tokenizer(path)
    assert (tokenizer.token_to_id(IMAGE_TOKEN), tokenizer.token_to_id(VIDEO_TOKEN)) == (8, 9)
    assert tokenizer.get_vocab_size() == 10
    ids = tokenizer.encode(f"{IMAGE_TOKEN}what is this ?{VIDEO_TOKEN}").ids
    assert ids == [8, 4, 5, 6, 7, 9]  # one token each, never split
    assert tokenizer.decode(ids, skip_special_tokens=True) == "what is this ?"
    assert load_tokenizer(path).get_vocab() == tokenizer.get_vocab()  # the same ids every load

    tokenizer.save(str(tmp_path / "with.json"))  # a tokenizer that has them is left as it is
    assert load_tokenizer(str(tmp_path / "with.json")).get_vocab() == tokenizer.get_vocab()

"""``python -m gazejax.convert``: HF -> gazejax -> HF through the command line is bit-exact;
a broken input is one line naming the file."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from gazejax.convert import ConversionError
from gazejax.convert.__main__ import main
from tests.hf_reference import save_qwen


def test_help_documents_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "gazejax.convert", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("hf-to-gazejax", "gazejax-to-hf", "npz-to-gazejax"):
        assert command in out


def test_hf_gazejax_hf_round_trip(tmp_path):
    save_qwen(tmp_path / "hf", "qwen2", seed=11, tie_word_embeddings=True)
    assert (
        main(["hf-to-gazejax", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "gj")])
        == 0
    )
    assert (
        main(["gazejax-to-hf", "--input", str(tmp_path / "gj"), "--output", str(tmp_path / "back")])
        == 0
    )
    original = load_file(tmp_path / "hf" / "model.safetensors")
    written = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(original) == sorted(written)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    save_qwen(folder, "qwen3", seed=1)
    return folder


def _cut_short(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def _drop_hidden_size(path: pathlib.Path) -> None:
    config = json.loads(path.read_text())
    del config["hidden_size"]
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "name,damage,message",
    [
        ("model.safetensors", _cut_short, "is not a valid safetensors file"),
        ("config.json", _cut_short, "is not valid JSON"),
        ("config.json", _drop_hidden_size, "has no 'hidden_size'"),
    ],
)
def test_a_broken_input_is_one_line_naming_the_file(
    hf_folder, tmp_path, capsys, name, damage, message
):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    damage(folder / name)
    argv = ["hf-to-gazejax", "--input", str(folder), "--output", str(tmp_path / "gj")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gazejax.convert: error: {folder / name} {message}"), err
    assert len(err.splitlines()) == 1 and err.endswith("(--debug for the traceback)")
    with pytest.raises(ConversionError, match=message):
        main([*argv, "--debug"])

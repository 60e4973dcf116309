"""``python -m gazejax.convert``: HF -> gazejax -> HF through the command line is bit-exact."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

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

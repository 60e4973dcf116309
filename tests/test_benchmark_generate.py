"""``benchmarks/generate.py`` end to end at tiny sizes: JSON written, dense == transformers."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "benchmark_generate", os.path.join(ROOT, "benchmarks", "generate.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_json_and_dense_matches_transformers(tmp_path, capsys):
    out = tmp_path / "generate.json"
    result = load_benchmark().main(
        [
            "--models",
            "small",
            "--contexts",
            "576",
            "--new-tokens",
            "3",
            "--layers",
            "1",
            "--vocab",
            "512",
            "--hidden",
            "64",
            "--intermediate",
            "128",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--head-dim",
            "16",
            "--prefill-chunk",
            "256",
            "--out",
            str(out),
        ]
    )
    assert "dense tokens == transformers tokens: True" in capsys.readouterr().out
    with open(out) as f:
        saved = json.load(f)
    assert saved["records"] == json.loads(json.dumps(result["records"]))
    (record,) = saved["records"]
    assert record["model"] == "small" and record["dense_equals_hf"]
    assert record["prompt_length"] == 576 + 4 + 16
    assert record["top_k"] == 3  # K·36 ≈ 16 % of 576
    for method in ("dense", "gaze", "hf"):
        assert len(record["tokens"][method]) == 4  # the prefill's token and 3 decode steps
        assert record["tokens_per_s"][method] > 0
    assert 0.0 <= record["gaze_agreement"] <= 1.0
    assert record["floor"]["gaze"]["kv_bytes"] < record["floor"]["dense"]["kv_bytes"]


def test_gaze_prefill_chunks_hold_whole_units():
    chunks = load_benchmark()._unit_chunks
    unit = np.asarray([-1] * 3 + [0] * 6 + [1] * 6 + [-1] * 2 + [2] * 6 + [-1] * 4)
    assert chunks(unit, 100) == [0, len(unit)]
    assert chunks(unit, 12) == [0, 9, 17, len(unit)]  # text before/between stays with a unit
    assert chunks(unit, 1) == [0, 3, 9, 17, len(unit)]  # one unit a chunk at the least

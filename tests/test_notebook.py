"""launch/ablations.ipynb runs end to end with tiny settings (its code cells as one script)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "ablations.ipynb"


def notebook_script(path: pathlib.Path) -> str:
    """The notebook's code cells, in order, as one Python script (it has no IPython magics)."""
    cells = json.loads(path.read_text())["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def test_the_notebook_is_plain_python():
    script = notebook_script(NOTEBOOK)
    compile(script, str(NOTEBOOK), "exec")
    lines = [line.lstrip() for line in script.splitlines()]
    assert not [line for line in lines if line.startswith(("!", "%"))]


@pytest.mark.slow
def test_the_ablations_notebook_runs_end_to_end(tmp_path):
    env = {
        **os.environ,
        "GAZEJAX_ABLATIONS_TINY": "1",
        "GAZEJAX_ABLATIONS_DIR": str(tmp_path),
        "MPLBACKEND": "Agg",
    }
    run = subprocess.run(
        [sys.executable, "-c", notebook_script(NOTEBOOK)],
        cwd=ROOT / "launch",  # as Jupyter starts it; the notebook finds the checkout itself
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    table = json.loads((tmp_path / "ablations.json").read_text())
    names = [row["variant"] for row in table["rows"]]
    assert names == [
        "dense",
        "gaze",
        "region_1x1",
        "region_3x3",
        "k1",
        "k4",
        "no_context",
        "no_progressive",
        "shared_routing",
        "pre_rope",
    ]
    k = {row["variant"]: row["top_k"]["0.22"] for row in table["rows"]}  # image tasks: one K
    assert k["region_1x1"] == 8 and k["region_3x3"] == 1
    for row in table["rows"]:
        assert 0.0 <= row["dense"] <= 1.0 and row["num_examples"] == 7 * 3  # 3 answers each
        assert row["later_turns"] is not None
        errors = row["errors"]  # standard errors: the table's s.e. column, the plot's bars
        assert set(errors) == {"dense", "0.22"} and min(errors.values()) >= 0.0
        config = json.loads((tmp_path / row["variant"] / "config.json").read_text())
        assert config["total_steps"] == 2 and config["data"]["synthetic"]["turns"] == 3
    configs = {n: json.loads((tmp_path / n / "config.json").read_text()) for n in names}
    assert configs["region_3x3"]["model"]["region_size"] == [3, 3, 1]
    assert configs["no_context"]["model"]["num_context_tokens"] == 0
    assert configs["no_progressive"]["progressive_top_k"]["decay_fraction"] == 0.0
    assert configs["k4"]["model"]["gaze"]["top_k"] == 4
    assert configs["shared_routing"]["model"]["gaze"]["routing"] == "shared"
    assert configs["pre_rope"]["model"]["gaze"]["descriptor_keys"] == "pre_rope"
    assert configs["gaze"]["model"]["gaze"]["routing"] == "per_head"
    assert configs["gaze"]["model"]["gaze"]["descriptor_keys"] == "post_rope"
    assert (tmp_path / "ablations.md").read_text().count("\n") == 2 + len(names)
    assert (tmp_path / "ablations.png").stat().st_size > 10_000

"""Workdirs on a cloud filesystem (``gs://``) stay cloud paths: configs, metrics, checkpoints and
the tokenizer go through ``etils.epath`` (what orbax uses), never through a local path named
``gs:``.

The tests' ``gs://`` is a fake Google Cloud Storage over a local folder: the ``gs`` filesystem
of epath (it refuses appends, as GCS does), tensorstore's ``file`` driver for orbax's arrays,
and no hierarchical namespace (which orbax asks the bucket about). Nothing may appear in the
working directory, where a mangled ``gs:/bucket/run`` would.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import sys
from collections.abc import Callable

import jax
import numpy as np
import pytest
from etils import epath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils
from PIL import Image

from gazejax import checkpointing, metrics
from gazejax.checkpointing import HISTORY_DIR, Checkpointer, write_config
from gazejax.data.sources import ConversationSource
from gazejax.eval.reports import write_reports
from gazejax.paths import as_path

BUCKET = "gs://bucket/run"


class FakeCloudStorage(DirFileSystem):
    """``gs://NAME/...`` stored under a local ``root/NAME/...``; no appends, as on GCS."""

    protocol = ("gs", "gcs")

    def __init__(self, root: pathlib.Path):
        super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

    def _open(self, path, mode="rb", *args, **kwargs):
        if "a" in mode:
            raise NotImplementedError("GCS objects cannot be appended to")
        return super()._open(path, mode, *args, **kwargs)


def install_fake_cloud(root: pathlib.Path, patch: Callable = setattr) -> None:
    """Routes ``gs://`` (epath, orbax, tensorboard) to ``root``; ``patch(obj, name, value)``
    (``monkeypatch.setattr`` undoes it after a test)."""
    storage = FakeCloudStorage(root)

    def kvstore(path: str) -> dict:
        name, rest = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(root, name.removeprefix("gs://"), rest)}

    patch(epath.backend.fsspec_backend, "_get_filesystem", lambda name: storage)
    patch(gcs_utils, "get_kvstore_for_gcs", kvstore)
    patch(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    clients = {**metrics.TENSORBOARD_CLIENTS, "gs://": "gazejax_no_such_client"}
    patch(metrics, "TENSORBOARD_CLIENTS", clients)  # no google-cloud-storage


def stored(root: pathlib.Path) -> set[str]:
    """The files of :data:`BUCKET` (names relative to it)."""
    base = root / BUCKET.removeprefix("gs://")
    return {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()}


@pytest.fixture
def cloud(monkeypatch, tmp_path):
    """The fake cloud's local root; the working directory is an empty ``tmp_path / "cwd"``."""
    root, cwd = tmp_path / "gcs", tmp_path / "cwd"
    root.mkdir()
    cwd.mkdir()
    install_fake_cloud(root, monkeypatch.setattr)
    monkeypatch.chdir(cwd)
    yield root
    assert os.listdir(cwd) == []


def test_config_json_and_its_history_are_written_on_the_cloud(cloud):
    write_config(BUCKET, '{"seed": 0}', step=0)
    write_config(BUCKET, '{"seed": 0}', step=0)  # unchanged: nothing moves
    write_config(BUCKET, '{"seed": 1}', step=5)
    assert stored(cloud) == {"config.json", f"{HISTORY_DIR}/step5.json"}
    assert (as_path(BUCKET) / "config.json").read_text() == '{"seed": 1}'
    assert (as_path(BUCKET) / HISTORY_DIR / "step5.json").read_text() == '{"seed": 0}'


def test_a_checkpointer_hands_orbax_the_cloud_path(cloud, monkeypatch):
    given = []
    monkeypatch.setattr(
        checkpointing.ocp, "CheckpointManager", lambda directory, **_: given.append(directory)
    )
    checkpointer = Checkpointer(BUCKET, every_steps=1, max_to_keep=1)
    assert [str(d) for d in given] == [f"{BUCKET}/checkpoints"]
    assert str(checkpointer.directory / "3" / "state") == f"{BUCKET}/checkpoints/3/state"


def test_a_resumed_runs_metrics_drop_later_records_on_the_cloud(cloud):
    writer = metrics.MetricsWriter(BUCKET, total_steps=3)
    for step in (1, 2, 3):
        writer.write(step, {"loss": step})
    writer.close()
    writer = metrics.MetricsWriter(BUCKET, total_steps=3, first_step=2)  # resumed at step 2
    writer.write(3, {"loss": 30.0})
    lines = (as_path(BUCKET) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["train/loss"] for line in lines] == [1.0, 2.0, 30.0]


def test_records_and_their_images_are_read_from_the_cloud(cloud):
    record = {
        "id": "r0",
        "image": "red.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"},
            {"from": "gpt", "value": "red"},
        ],
    }
    (as_path(BUCKET) / "train.jsonl").write_text("\n" + json.dumps(record) + "\n")
    png = io.BytesIO()
    Image.new("RGB", (6, 4), (255, 0, 0)).save(png, format="PNG")
    (as_path(BUCKET) / "images" / "red.png").write_bytes(png.getvalue())
    source = ConversationSource(
        f"{BUCKET}/train.jsonl", f"{BUCKET}/images", image_size=8, max_frames=1
    )
    example = source[0]
    assert example["location"].line == 2
    np.testing.assert_array_equal(example["visuals"][0][0, 4, 4], [1.0, -1.0, -1.0])


def tiny_config(total_steps: int):
    """The synthetic config shrunk to a few seconds of training (image tasks, dense)."""
    from configs.synthetic import get_config

    config = get_config("attention=dense")
    config.total_steps = total_steps
    config.batch_size = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.eval_every_steps = 100
    config.eval_examples = 2
    config.optim.warmup_steps = 1
    config.data.synthetic.update(image_size=32, grid=2, max_objects=2)
    for task in ("shape", "size", "order", "compare_size", "video_appear", "video_order"):
        config.data.synthetic.tasks[task] = 0
    config.data.buckets.image.update(length=96, num_regions=4)
    config.model.vit.update(image_size=32, width=16, depth=1, mlp_dim=16, num_heads=1)
    config.model.decoder.update(hidden_size=16, intermediate_size=16, num_layers=1, head_dim=4)
    return config


def check_a_run_trains_resumes_and_loads(root: pathlib.Path, printed: Callable[[], str]) -> None:
    from gazejax.inference.checkpoints import load_checkpoint
    from gazejax.train import train

    train(tiny_config(total_steps=2), BUCKET)
    files = stored(root)
    for name in ("config.json", "metrics.jsonl", "final_eval.json", "checkpoints/2/state"):
        assert any(f == name or f.startswith(name + "/") for f in files), (name, sorted(files))
    assert "no TensorBoard events" in printed()
    lines = (as_path(BUCKET) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 2]  # train 1, 2; eval 2

    train(tiny_config(total_steps=2), BUCKET)  # resumes at the end: evaluates what is there
    assert "resumed from step 2" in printed()

    checkpoint = load_checkpoint(BUCKET)
    assert checkpoint.step == 2 and checkpoint.run_config["total_steps"] == 2
    leaves = jax.tree.leaves(checkpoint.params)
    assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_a_run_trains_resumes_and_loads_on_the_cloud(tmp_path):
    """A tiny training run (in a subprocess, compiled fast) whose workdir is ``gs://``."""
    from tests.simulated_devices import FAST_COMPILE, run_script

    results = run_script(__file__, 1, [str(tmp_path)], xla_flags=FAST_COMPILE)
    assert results == {"run": "ok"}, results["run"]
    assert not (tmp_path / "cwd" / "gs:").exists()


if __name__ == "__main__":
    import contextlib
    import io

    from tests.simulated_devices import print_results, run_checks

    base = pathlib.Path(sys.argv[1])
    (base / "gcs").mkdir()
    (base / "cwd").mkdir()
    install_fake_cloud(base / "gcs")
    os.chdir(base / "cwd")
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        results = run_checks(
            {"run": (check_a_run_trains_resumes_and_loads, base / "gcs", output.getvalue)}
        )
    results["run"] += "" if os.listdir(base / "cwd") == [] else " (wrote in the working dir)"
    print_results(results)


def test_evaluation_reports_are_written_on_the_cloud(cloud):
    stats = {"score": 0.5, "stderr": 0.25, "num_examples": 4, "visual_kv_fraction": 0.25}
    record = {
        **stats,
        "benchmark": "mini",
        "metric": "exact_match",
        "method": "gaze",
        "label": "gaze@0.25",
        "kv_fraction": 0.3,
        "seconds": 1.0,
        "by_family": {"image": stats},
    }
    results = {"benchmarks": {"mini": {}}, "records": [record], "notes": []}
    write_reports(results, f"{BUCKET}/eval")
    assert stored(cloud) == {"eval/results.json", "eval/results.md", "eval/score_vs_kv.png"}
    assert json.loads((as_path(BUCKET) / "eval/results.json").read_text()) == results
    assert (
        "| gaze@0.25 | 25.0 | 30.0 | 50.0 ± 25.0 |"
        in (as_path(BUCKET) / "eval/results.md").read_text()
    )
    assert (as_path(BUCKET) / "eval/score_vs_kv.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

"""Resuming a workdir: the config checked against the checkpoint's before anything is written,
a fallback past checkpoints that do not restore, config history, one metrics record per step,
and the command line's one-line errors."""

from __future__ import annotations

import glob
import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.synthetic import get_config
from gazejax.checkpointing import (
    Checkpointer,
    RestoreError,
    TrainState,
    check_resume_config,
    write_config,
)
from gazejax.configuration import ConfigError
from gazejax.metrics import MetricsWriter

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_only_schedule_and_logging_keys_may_change_on_resume():
    saved = get_config("runlocal").to_dict()
    requested = get_config("runlocal")
    requested.total_steps, requested.log_every_steps = 12, 1
    requested.optim.learning_rate = 1e-4
    changes = check_resume_config(saved, requested.to_dict(), "ckpt")
    assert changes == [
        "log_every_steps: 2 → 1",
        "optim.learning_rate: 0.0003 → 0.0001",
        "total_steps: 6 → 12",
    ]
    requested.model.decoder.hidden_size = 64
    requested.model.decoder.rope_theta = 1e6
    requested.seed = 1
    with pytest.raises(ConfigError) as error:
        check_resume_config(saved, requested.to_dict(), "ckpt")
    message = str(error.value)
    assert "model.decoder.hidden_size: 128 → 64" in message
    assert "model.decoder.rope_theta: 10000.0 → 1000000.0" in message
    assert "seed: 0 → 1" in message
    assert "total_steps" not in message and "\n" not in message
    del saved["model"]["decoder"]["rope_theta"]  # a key one side lacks is a difference too
    with pytest.raises(ConfigError, match=r"rope_theta: '\(absent\)' → 10000.0"):
        check_resume_config(saved, get_config("runlocal").to_dict(), "ckpt")


def test_a_changed_model_is_refused_before_anything_is_written(tmp_path):
    """Issue 17, cases 1 and 2: a resume with another hidden size or RoPE base fails with the
    keys named, and the workdir (config.json included) is left byte for byte as it was."""
    from gazejax.train import train

    config = get_config("runlocal")
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
    checkpointer = Checkpointer(str(tmp_path), every_steps=1, max_to_keep=2)
    checkpointer.save(6, {"x": jnp.zeros(3)}, config.to_dict(), {})
    checkpointer.close()
    before = _files(tmp_path)
    config.model.decoder.hidden_size = 64
    config.model.decoder.rope_theta = 1e6
    with pytest.raises(ConfigError) as error:
        train(config, str(tmp_path))
    assert "model.decoder.hidden_size: 128 → 64" in str(error.value)
    assert "model.decoder.rope_theta: 10000.0 → 1000000.0" in str(error.value)
    assert str(tmp_path / "checkpoints" / "6") in str(error.value)
    assert _files(tmp_path) == before


def _state(step: int) -> TrainState:
    params = {"w": jnp.arange(600.0).reshape(6, 100) * step, "b": jnp.full((7,), float(step))}
    return TrainState(jnp.int32(step), params, optax.adam(1e-3).init(params))


def _abstract(state):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), state)


def test_restore_falls_back_past_checkpoints_that_do_not_restore(tmp_path, caplog):
    """Issue 17, case 3: a truncated tensor file (step 3) and a deleted ``_METADATA`` (step 2):
    each is logged on one line and set aside intact; step 1 restores, with its data item."""
    config = {"model": {"width": 8}, "total_steps": 3}
    checkpointer = Checkpointer(str(tmp_path), every_steps=1, max_to_keep=3)
    for step in (1, 2, 3):
        checkpointer.save(step, _state(step), config, {"skipped_records": [step, 9]})
    checkpointer.close()
    steps = tmp_path / "checkpoints"
    tensor = max(glob.glob(f"{steps}/3/state/**/d/*", recursive=True), key=os.path.getsize)
    with open(tensor, "r+b") as f:
        f.truncate(os.path.getsize(tensor) // 2)
    os.remove(steps / "2" / "state" / "_METADATA")
    bad = {s: _files(steps / str(s)) for s in (2, 3)}

    checkpointer = Checkpointer(str(tmp_path), every_steps=1, max_to_keep=3)
    with caplog.at_level(logging.WARNING):
        restored = checkpointer.restore_latest(_abstract(_state(1)), config)
    assert restored.step == 1 and restored.changes == []
    assert restored.data == {"skipped_records": [1, 9]}
    np.testing.assert_array_equal(restored.state.params["w"], _state(1).params["w"])
    failed = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert len(failed) == 2 and all("\n" not in line for line in failed)
    assert sum("moved" in r.getMessage() for r in caplog.records) == 2
    assert f"{steps}/3 does not restore (ValueError: OUT_OF_RANGE" in failed[0]
    assert f"{steps}/2 does not restore (ValueError: pytree structure error" in failed[1]
    for step, files in bad.items():  # set aside, intact; orbax no longer lists them
        assert _files(tmp_path / "checkpoints.corrupt" / str(step)) == files
    assert checkpointer.all_steps() == [1]
    for step in (2, 3, 4):  # the run saves those steps afresh; its clean-up keeps the bad ones
        assert checkpointer.save(step, _state(step), config, {})
    checkpointer.close()
    assert sorted(os.listdir(steps)) == ["2", "3", "4"]
    assert sorted(os.listdir(tmp_path / "checkpoints.corrupt")) == ["2", "3"]

    os.remove(steps / "4" / "state" / "_METADATA")
    wider = {**config, "model": {"width": 16}}  # refused at once: nothing tried, nothing moved
    with pytest.raises(ConfigError, match="model.width: 8 → 16"):
        Checkpointer(str(tmp_path), 1, 3).restore_latest(_abstract(_state(1)), wider)
    assert os.path.exists(steps / "4" / "state")
    for step in (2, 3):
        os.remove(steps / str(step) / "state" / "_METADATA")
    with pytest.raises(RestoreError, match=r"restores: step 4: .*; step 3: .*; step 2: "):
        Checkpointer(str(tmp_path), 1, 3).restore_latest(_abstract(_state(1)), config)


def test_config_json_is_replaced_whole_and_the_previous_one_kept(tmp_path):
    write_config(str(tmp_path), '{"total_steps": 4}', step=0)
    write_config(str(tmp_path), '{"total_steps": 4}', step=4)  # unchanged: no history
    assert not (tmp_path / "config_history").exists()
    write_config(str(tmp_path), '{"total_steps": 8}', step=4)
    write_config(str(tmp_path), '{"total_steps": 9}', step=4)
    assert (tmp_path / "config.json").read_text() == '{"total_steps": 9}'
    history = tmp_path / "config_history"
    assert (history / "step4.json").read_text() == '{"total_steps": 4}'
    assert (history / "step4.2.json").read_text() == '{"total_steps": 8}'
    assert sorted(os.listdir(tmp_path)) == ["config.json", "config_history"]  # no temporaries


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """Issue 17, case 7: steps logged after the checkpoint by a killed run (and a line the kill
    cut short) are dropped when the run resumes from that checkpoint and logs them again."""
    writer = MetricsWriter(str(tmp_path), total_steps=5)
    for step in range(1, 5):
        writer.write(step, {"loss": 1.0 / step})
    writer.write(4, {"accuracy": 0.5}, prefix="eval")
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # killed mid-write
    writer = MetricsWriter(str(tmp_path), total_steps=5, first_step=2)  # resumed from step 2
    for step in range(3, 6):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(set(r) == {"step", "train/loss"} for r in records)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gazejax.train", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        cwd=ROOT,
        timeout=600,
    )


def test_command_line_user_errors_are_one_line(tmp_path):
    """Issue 17, case 7: a config typo and a resume that does not fit each end the command in
    one line naming the key (not a traceback and orbax's shutdown noise); --debug shows it."""
    config = get_config("runlocal")
    checkpointer = Checkpointer(str(tmp_path), every_steps=1, max_to_keep=1)
    checkpointer.save(6, {"x": jnp.zeros(3)}, config.to_dict(), {})
    checkpointer.close()
    run = ["--config=configs/synthetic.py:runlocal", f"--workdir={tmp_path}"]
    cases = {
        "--config.optim.learning_rte: no such config key.": "--config.optim.learning_rte=1",
        "model.decoder.num_layers: 3 → 2": "--config.model.decoder.num_layers=2",
    }
    for expected, arg in cases.items():
        result = _cli(*run, arg)
        assert result.returncode == 1, result.stderr[-2000:]
        (line,) = result.stderr.splitlines()
        assert line.startswith("error: ") and expected in line, line
        assert "Traceback" not in result.stdout
    debug = _cli(*run, "--config.model.decoder.num_layers=2", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "ConfigError: cannot resume" in debug.stderr
    # A bucket too small for the region size (a fresh run): the key and the value it needs.
    fresh = _cli(
        "--config=configs/synthetic.py:runlocal",
        f"--workdir={tmp_path / 'fresh'}",
        "--config.model.region_size=(1,1,1)",
    )
    assert fresh.returncode == 1
    assert fresh.stderr.splitlines()[-1].startswith(
        "error: config.data.buckets.image.num_regions=9 is too small: a sample of step 0 needs 36"
    )


def test_a_missing_tokenizer_is_named(tmp_path):
    from gazejax.data.records import DataError
    from gazejax.train import train

    config = get_config("runlocal")
    config.data.name = "jsonl"
    config.data.jsonl.update(train="t.jsonl", eval="t.jsonl", image_root=str(tmp_path))
    config.data.buckets = {"all": {"length": 80, "max_units": 1, "num_regions": 9}}
    config.data.tokenizer = str(tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match=f"{tmp_path}/tokenizer.json: cannot load the tokenizer"):
        train(config, str(tmp_path / "run"))

"""Workdirs on a cloud filesystem (``gs://``) stay cloud paths: configs and checkpoints go
through ``etils.epath`` (what orbax uses), never through a local path named ``gs:``. The test's
``gs://`` is an in-memory fsspec filesystem registered for the scheme."""

from __future__ import annotations

import os

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from gazejax import checkpointing
from gazejax.checkpointing import HISTORY_DIR, Checkpointer, as_path, write_config


class FakeCloudStorage(MemoryFileSystem):
    """An in-memory stand-in for Google Cloud Storage."""

    protocol = ("gs", "gcs")

    def __init__(self, *args, finalize_on_close=False, **kwargs):
        del finalize_on_close  # what etils passes to gcsfs
        super().__init__(*args, **kwargs)


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """``gs://bucket/run``, empty; the working directory is ``tmp_path`` (where a mangled
    ``gs:/bucket/run`` would appear)."""
    monkeypatch.chdir(tmp_path)
    for name in FakeCloudStorage.protocol:
        fsspec.register_implementation(name, FakeCloudStorage, clobber=True)
    FakeCloudStorage.store.clear()
    yield "gs://bucket/run"
    FakeCloudStorage.store.clear()


def test_config_json_and_its_history_are_written_on_the_cloud(bucket, tmp_path):
    write_config(bucket, '{"seed": 0}', step=0)
    write_config(bucket, '{"seed": 0}', step=0)  # unchanged: nothing moves
    write_config(bucket, '{"seed": 1}', step=5)
    assert sorted(FakeCloudStorage.store) == [
        f"{bucket}/config.json",
        f"{bucket}/{HISTORY_DIR}/step5.json",
    ]
    assert (as_path(bucket) / "config.json").read_text() == '{"seed": 1}'
    assert (as_path(bucket) / HISTORY_DIR / "step5.json").read_text() == '{"seed": 0}'
    assert os.listdir(tmp_path) == []


def test_a_checkpointer_hands_orbax_the_cloud_path(bucket, tmp_path, monkeypatch):
    """(orbax's own gs:// support needs google-cloud-storage and a bucket: the manager is
    replaced by a recorder of what it is given.)"""
    given = []
    monkeypatch.setattr(
        checkpointing.ocp, "CheckpointManager", lambda directory, **_: given.append(directory)
    )
    checkpointer = Checkpointer(bucket, every_steps=1, max_to_keep=1)
    assert [str(d) for d in given] == [f"{bucket}/checkpoints"]
    assert str(checkpointer.directory / "3" / "state") == f"{bucket}/checkpoints/3/state"
    assert os.listdir(tmp_path) == []

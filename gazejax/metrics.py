"""Training metrics: console lines with progress and ETA, ``metrics.jsonl`` and TensorBoard.

The workdir may be local or on a cloud filesystem (``gs://``; through ``etils.epath``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Mapping

from etils import epath
from tensorboardX import SummaryWriter

from gazejax.paths import as_path, is_local, write_atomically

# The cloud schemes tensorboardX writes event files to itself, and the client each needs.
TENSORBOARD_CLIENTS = {"gs://": "google.cloud.storage", "s3://": "boto3"}


class MetricsWriter:
    """Writes scalar metrics of a step to the console, ``WORKDIR/metrics.jsonl`` and TensorBoard.

    ``metrics.jsonl`` is appended to (one JSON object per write), so a resumed run continues it:
    a run that starts at ``first_step`` (the checkpoint it resumed, or 0) first drops the records
    of later steps, which it is about to log again (they were written after that checkpoint, by a
    run that was killed), so each step keeps one record. TensorBoard purges them likewise. On a
    cloud filesystem, whose objects cannot be appended to, each write rewrites the file.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        total_steps: int,
        first_step: int = 0,
        enabled: bool = True,
    ):
        self.total_steps = total_steps
        self.enabled = enabled
        self._start_time = time.monotonic()
        self._start_step = first_step
        if enabled:
            workdir = as_path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = _JsonLines(workdir / "metrics.jsonl", first_step)
            self._tensorboard = _tensorboard(workdir / "tensorboard", purge_step=first_step + 1)

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step":
                    self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        print(self._line(step, record), flush=True)

    def _line(self, step: int, record: Mapping[str, float]) -> str:
        done = step - self._start_step
        elapsed = time.monotonic() - self._start_time
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        values = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step")
        percent = 100.0 * step / max(self.total_steps, 1)
        return f"[{step}/{self.total_steps} {percent:5.1f}% eta {eta:6.0f}s] {values}"

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tensorboard is not None:
                self._tensorboard.close()


class _JsonLines:
    """A JSON-lines file that grows by whole lines: appended to on a local filesystem,
    rewritten (atomically) on each write on a cloud one."""

    def __init__(self, path: epath.Path, first_step: int):
        self.path = path
        _drop_records_after(path, first_step)
        if is_local(path):
            self._file, self._text = path.open("a"), None
        else:
            self._file, self._text = None, path.read_text() if path.exists() else ""

    def write(self, line: str) -> None:
        if self._file is None:
            self._text += line
            write_atomically(self.path, self._text)
        else:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _tensorboard(directory: epath.Path, purge_step: int) -> SummaryWriter | None:
    """tensorboardX's writer into ``directory``, or None (said once) where it cannot write: a
    cloud scheme it does not know, or whose client is not installed."""
    name = str(directory)
    if not is_local(directory):
        client = next((c for s, c in TENSORBOARD_CLIENTS.items() if name.startswith(s)), None)
        if client is None or not _importable(client):
            needs = f"needs {client}" if client else f"writes {', '.join(TENSORBOARD_CLIENTS)}"
            print(f"{name}: no TensorBoard events (tensorboardX {needs}); metrics.jsonl has them")
            return None
    return SummaryWriter(name, purge_step=purge_step)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _drop_records_after(path: epath.Path, step: int) -> None:
    """Rewrites ``path`` (atomically) without the records of steps after ``step``, and without
    a line cut short by a kill."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a partial last line
            continue
    if len(kept) < len(lines):
        write_atomically(path, "".join(line + "\n" for line in kept))
        print(f"{path}: dropped {len(lines) - len(kept)} record(s) after step {step}", flush=True)

"""Training metrics: console lines with progress and ETA, ``metrics.jsonl`` and TensorBoard."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

from tensorboardX import SummaryWriter

from gazejax.checkpointing import write_atomically


class MetricsWriter:
    """Writes scalar metrics of a step to the console, ``WORKDIR/metrics.jsonl`` and TensorBoard.

    ``metrics.jsonl`` is appended to (one JSON object per write), so a resumed run continues it:
    a run that starts at ``first_step`` (the checkpoint it resumed, or 0) first drops the records
    of later steps, which it is about to log again (they were written after that checkpoint, by a
    run that was killed), so each step keeps one record. TensorBoard purges them likewise.
    """

    def __init__(self, workdir: str, total_steps: int, first_step: int = 0, enabled: bool = True):
        self.total_steps = total_steps
        self.enabled = enabled
        self._start_time = time.monotonic()
        self._start_step = first_step
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            _drop_records_after(path, first_step)
            self._jsonl = open(path, "a")  # noqa: SIM115
            self._tensorboard = SummaryWriter(
                os.path.join(workdir, "tensorboard"), purge_step=first_step + 1
            )

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
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
            self._tensorboard.close()


def _drop_records_after(path: str, step: int) -> None:
    """Rewrites ``path`` (atomically) without the records of steps after ``step``, and without
    a line cut short by a kill."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
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

"""Training checkpoints and the workdir's config: ``WORKDIR/checkpoints`` (orbax) and
``WORKDIR/config.json``.

Each checkpoint holds three items: ``state`` (:class:`TrainState`), ``config`` (the training
config it was written with) and ``data`` (the distinct bad records dropped from training so
far). orbax writes each step to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact. The data position needs no state of its
own: batch ``s`` is a pure function of (seed, s), so resuming from step ``s`` resumes the data too.

Resuming (:meth:`Checkpointer.restore_latest`) checks the requested config against the
checkpoint's (:func:`check_resume_config`: only the keys in :data:`RESUMABLE` may change) and
falls back past checkpoints that do not restore, setting them aside in
``WORKDIR/checkpoints.corrupt/`` (never deleted; orbax no longer sees them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from gazejax.configuration import ConfigError
from gazejax.paths import as_path, write_atomically

# Config keys (a key, or a section and all its keys) whose value may differ between a checkpoint
# and the run that resumes it; a change is logged. Every other key must match: the model's and
# the data's (what the parameters mean, which examples batch ``s`` holds), the seed, the batch
# size and the optimizer (what its state means). A key not listed is refused, so that a key added
# later is safe until someone decides otherwise.
RESUMABLE = (
    "total_steps",  # a longer or shorter run: the schedules below follow it
    "optim.learning_rate",  # the learning-rate schedule
    "optim.warmup_steps",
    "progressive_top_k",  # the top-K schedule
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_every_steps",
    "eval_examples",
    "data.jsonl.eval",  # evaluation only
    "data.jsonl.image_root",  # where the same files are now
    "data.jsonl.video_root",
    "data.skip_bad_samples",  # whether a bad record stops the run
    "data.jsonl.max_skips",
    "grad_accum_steps",  # the same batch in other micro-batches
    "model.vit.remat",  # the same computation, recomputed or stored
    "model.decoder.remat",
    "model.units_per_encode",  # the same encoding, padding slots skipped or not
    "model.gaze.implementation",  # the same op by another kernel
    "mesh",  # where it runs: the restore reshards
    "logical_axis_rules",
    "distributed",
    "init_from",  # read by a fresh run only
)

CORRUPT_DIR = "checkpoints.corrupt"
HISTORY_DIR = "config_history"


@flax.struct.dataclass
class TrainState:
    """What a training checkpoint's ``state`` holds: the step, parameters, optimizer state."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState


class RestoreError(RuntimeError):
    """No checkpoint of a workdir restores; the message lists each one and why."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """A resumed checkpoint: its step, state and data item, and the allowed config changes
    (``"key: old → new"``)."""

    step: int
    state: Any
    data: dict
    changes: list[str]


def _flatten(config: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def check_resume_config(saved: Mapping, requested: Mapping, where: str) -> list[str]:
    """The changes from the ``saved`` config to the ``requested`` one (``"key: old → new"``),
    all of them keys of :data:`RESUMABLE`.

    Raises:
      ConfigError: listing every other key that differs (``where`` names the checkpoint).
    """
    # Both as JSON, in which the checkpoint stores its config (tuples become lists).
    old, new = (_flatten(json.loads(json.dumps(dict(c)))) for c in (saved, requested))
    absent = "(absent)"
    changes, refused = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key, absent) != new.get(key, absent):
            change = f"{key}: {old.get(key, absent)!r} → {new.get(key, absent)!r}"
            allowed = any(key == k or key.startswith(k + ".") for k in RESUMABLE)
            (changes if allowed else refused).append(change)
    if refused:
        raise ConfigError(
            f"cannot resume {where} with a different model, data or optimizer: "
            f"{'; '.join(refused)} (only schedule and logging keys may change; see README, "
            "Training)"
        )
    return changes


def _reason(error: BaseException) -> str:
    """One line: the innermost cause's type and first line (orbax wraps tensorstore's)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:300]}"


class Checkpointer:
    """Saves and restores ``{"state": pytree, "config": dict, "data": dict}`` steps."""

    def __init__(self, workdir: str, every_steps: int, max_to_keep: int):
        self.every_steps = every_steps
        self.workdir = as_path(workdir)
        self.directory = self.workdir / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "config", "data"),
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def due(self, step: int) -> bool:
        """Whether ``step`` is a multiple of ``every_steps``."""
        return step % self.every_steps == 0

    def save(self, step: int, state: Any, config: dict, data: dict) -> bool:
        """Saves ``step`` unless it is there already; returns whether it did."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(config),
                data=ocp.args.JsonSave(data),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """The state at ``step`` and its data item (``{}`` if it has none); ``abstract_state``
        holds ``jax.ShapeDtypeStruct`` leaves with the target shardings."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if (self.directory / str(step) / "data").is_dir():  # absent before
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], dict(restored.get("data") or {})

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters of ``step``'s state, restored straight into the shardings of
        ``abstract_params`` (``jax.ShapeDtypeStruct`` leaves): every host reads its shards."""
        item = {"params": abstract_params}
        restored = ocp.PyTreeCheckpointer().restore(
            self.directory / str(step) / "state",
            args=ocp.args.PyTreeRestore(
                item=item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            ),
        )
        return restored["params"]

    def saved_config(self, step: int) -> dict:
        """The training config stored with ``step`` (read alone, before the state is)."""
        return ocp.JsonCheckpointHandler().restore(self.directory / str(step) / "config")

    def check_config(self, config: Mapping) -> None:
        """Fails fast, before a run builds anything, on what :meth:`restore_latest` will refuse:
        the newest readable checkpoint's config differs from ``config`` outside :data:`RESUMABLE`.

        Raises:
          ConfigError: naming each differing key.
        """
        for step in reversed(self.all_steps()):
            try:
                saved = self.saved_config(step)
            except Exception:  # unreadable: restore_latest reports it
                continue
            check_resume_config(saved, config, str(self.directory / str(step)))
            return

    def restore_latest(self, abstract_state: Any, config: Mapping) -> Restored:
        """The newest checkpoint that restores, its config checked against ``config``.

        A checkpoint whose config or state fails to restore is logged (one line: the step and
        why) and the next older one is tried; once one restores, the failed ones move to
        ``WORKDIR/checkpoints.corrupt/<step>`` (``<step>.<n>`` if taken), so that the run saves
        those steps afresh and orbax's clean-up never deletes them.

        Raises:
          ConfigError: the newest readable checkpoint's config differs from ``config`` in a key
            outside :data:`RESUMABLE` (nothing is tried past it).
          RestoreError: no checkpoint restores (or there is none).
        """
        failed: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            where = str(self.directory / str(step))
            try:
                saved = self.saved_config(step)
            except Exception as error:  # any unreadable checkpoint: try the next
                failed.append((step, f"config: {_reason(error)}"))
                logging.warning("checkpoint %s does not restore (%s)", where, failed[-1][1])
                continue
            changes = check_resume_config(saved, config, where)
            try:
                state, data = self.restore(step, abstract_state)
            except Exception as error:  # any unreadable checkpoint: try the next
                failed.append((step, _reason(error)))
                logging.warning("checkpoint %s does not restore (%s)", where, failed[-1][1])
                continue
            self._set_aside([s for s, _ in failed])
            return Restored(step, state, data, changes)
        raise RestoreError(
            f"no checkpoint in {self.directory} restores: "
            + ("; ".join(f"step {s}: {why}" for s, why in failed) or "there is none")
        )

    def _set_aside(self, steps: list[int]) -> None:
        """Moves the ``steps`` to ``WORKDIR/checkpoints.corrupt/`` (process 0; all wait)."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                target = _free_path(self.workdir / CORRUPT_DIR, str(step))
                source = self.directory / str(step)
                source.rename(target)
                logging.warning("moved %s aside to %s", source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoints set aside")
        self.manager.reload()

    def restore_as_saved(self, step: int) -> Any:
        """The state at ``step`` as saved (host arrays, no target shardings): for inference."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        )
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _free_path(directory: epath.Path, stem: str, suffix: str = "") -> epath.Path:
    """``directory/<stem><suffix>``, or ``<stem>.<n><suffix>`` with the smallest free n >= 2."""
    directory.mkdir(parents=True, exist_ok=True)
    path, n = directory / (stem + suffix), 2
    while path.exists():
        path, n = directory / f"{stem}.{n}{suffix}", n + 1
    return path


def write_config(workdir: str | os.PathLike, text: str, step: int) -> None:
    """Writes ``WORKDIR/config.json`` (atomically; local or cloud). A different previous one
    moves to ``WORKDIR/config_history/step<step>.json`` (``step<step>.<n>.json`` if taken): the
    config that the run resumed from ``step`` replaced."""
    workdir = as_path(workdir)
    path = workdir / "config.json"
    if path.exists():
        if path.read_text() == text:
            return
        path.copy(_free_path(workdir / HISTORY_DIR, f"step{step}", ".json"))
    write_atomically(path, text)

"""Training checkpoints: train state + config under ``WORKDIR/checkpoints`` (orbax).

orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact. The data position needs no state of its own:
batch ``s`` is a pure function of (seed, s), so resuming from step ``s`` resumes the data too.
"""

from __future__ import annotations

import os
from typing import Any

import flax.struct
import jax
import optax
import orbax.checkpoint as ocp


@flax.struct.dataclass
class TrainState:
    """What a training checkpoint's ``state`` holds: the step, parameters, optimizer state."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState


class Checkpointer:
    """Saves and restores ``{"state": pytree, "config": dict}`` every ``every_steps`` steps."""

    def __init__(self, workdir: str, every_steps: int, max_to_keep: int):
        self.every_steps = every_steps
        self.manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "config"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, config: dict, force: bool = False) -> bool:
        """Saves at multiples of ``every_steps`` (or when ``force``); returns whether it did."""
        if not force and step % self.every_steps:
            return False
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The state at ``step``; ``abstract_state`` holds ``jax.ShapeDtypeStruct`` leaves with
        the target shardings."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored["state"]

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

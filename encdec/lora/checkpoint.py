"""Orbax checkpoints of adapter training: the whole :class:`~encdec.lora.train.TrainState`
(adapter weights and scales, optimizer state, step, RNG) plus the metric history, every N steps.

Only the adapter and its optimizer state are written, never the base model. Restoring into a
freshly initialised state gives back the exact arrays, so a resumed run continues bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


class AdapterCheckpointer:
    """Save every ``every`` steps (keeping the newest ``max_to_keep``) and restore the latest."""

    def __init__(self, directory: str | Path, *, every: int, max_to_keep: int = 2):
        if every <= 0:
            raise ValueError(f"checkpoint every: must be positive, got {every}")
        self.directory = Path(directory).absolute()
        self.every = every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "history"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: Any, history: list[dict[str, float]], *, force: bool = False) -> bool:
        """Write a checkpoint when ``state.step`` is a multiple of ``every`` (or ``force``)."""
        step = int(state.step)
        if not force and step % self.every:
            return False
        if step in self._manager.all_steps():
            return False
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)),
            force=True,
        )
        self._manager.wait_until_finished()
        return True

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, list[dict[str, float]]]:
        """``(state, history)`` of ``step`` (default: the latest), shaped like ``target``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), history=ocp.args.JsonRestore()),
        )
        return restored["state"], list(restored["history"])

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""Training checkpoints with orbax: async saves, keep the last K, resume, reshard on restore.

A checkpoint holds the model state (parameters and the routing bias), the optimizer state and
a JSON `extra` dict (step, data position, RNG seed, metrics, ...). orbax writes each step into
a temporary folder and renames it when complete, so a save that fails or is interrupted never
replaces the last good checkpoint. Restoring targets the *current* model's shardings, so a run
saved on one mesh resumes on another.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx


class CheckpointRestoreError(RuntimeError):
    """A checkpoint folder exists but cannot be read back; the message names it."""


def _abstract(tree):
    """ShapeDtypeStructs carrying each array's current sharding (restore reshards to these)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


class Checkpointer:
    """`save(step, model, optimizer, extra)` / `restore(step, model, optimizer) -> extra`."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer | None,
             extra: dict) -> None:
        """Start saving (returns while an async write continues; see `wait`)."""
        items = {"model": ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
                 "extra": ocp.args.JsonSave(extra)}
        if optimizer is not None:
            items["optimizer"] = ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer.opt_state)))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, step: int | None, model: nnx.Module, optimizer: nnx.Optimizer | None = None
                ) -> dict:
        """Load `step` (default: the latest) into `model` / `optimizer` in place; returns extra."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointRestoreError(f"no checkpoint in {self.directory}")
        model_state = nnx.state(model)
        items = {"model": ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(model_state))),
                 "extra": ocp.args.JsonRestore()}
        if optimizer is not None:
            opt_state = nnx.state(optimizer.opt_state)
            items["optimizer"] = ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(opt_state)))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types for unreadable folders
            raise CheckpointRestoreError(
                f"checkpoint step {step} in {self.directory} cannot be restored "
                f"({type(e).__name__}: {e})") from e
        nnx.replace_by_pure_dict(model_state, restored["model"])
        nnx.update(model, model_state)
        if optimizer is not None:
            nnx.replace_by_pure_dict(opt_state, restored["optimizer"])
            nnx.update(optimizer.opt_state, opt_state)
        return dict(restored["extra"])

    def wait(self) -> None:
        """Block until async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

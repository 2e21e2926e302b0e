"""Per-epoch checkpoints of a run (or a fused group): written whole or not at all, and read back
only when they belong to the same run."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable

import torch


def save_checkpoint(path: Path, state: dict[str, Any], *, attempts: int = 5) -> None:
    """Write ``state`` to ``path`` through a temporary file, fsynced and then renamed, so that a kill
    mid-write leaves the previous checkpoint, never half of one.

    Runs of a grid share the checkpoint folder, and a run that finishes removes the folder when it is
    left empty (``discard_checkpoint``): between our ``mkdir`` and our write another worker may have
    removed it. The folder is then made again and the write retried."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    for attempt in range(attempts):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return
        except FileNotFoundError:  # the folder went away under us
            with contextlib.suppress(OSError):
                tmp.unlink()
            if attempt + 1 == attempts:
                raise


def discard_checkpoint(path: Path) -> None:
    """Remove a finished run's checkpoint, and the folder when no other run's checkpoint is left in it
    (a worker saving at the same moment makes it again: ``save_checkpoint``)."""
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def load_checkpoint(path: Path | None, device: torch.device, owner: tuple[str, Any],
                    log: Callable[[str], None]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if there is one, it can be read and its ``owner[0]`` field
    equals ``owner[1]`` (the run's key: another run's checkpoint is not ours to resume)."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # cut short by a crash, or from another version: train from the start
        log(f"ignoring unreadable checkpoint {path} ({type(exc).__name__}); starting over")
        return None
    field, value = owner
    return state if state.get(field) == value else None


def checkpoint_members(path: str | os.PathLike) -> list[str] | None:
    """The run keys a group checkpoint holds, without reading its tensors; None if unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return list(state["members"])
    except Exception:
        return None


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """What every trainer's checkpoint holds besides its own records: the model, optimizer and
    scheduler states, under the keys ``restore_training_state`` reads."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}


def restore_training_state(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: Any) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])

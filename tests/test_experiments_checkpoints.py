"""Checkpoints shared by the workers of a grid: the race between one worker's save and another's
clean-up, provoked deterministically, and writes that are whole or absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gammaguide.experiments import checkpoints
from gammaguide.experiments.checkpoints import discard_checkpoint, load_checkpoint, save_checkpoint


def _other_worker_finishes_right_after_mkdir(monkeypatch, folder: Path, times: int = 1) -> list[int]:
    """Make ``Path.mkdir`` of ``folder`` behave as if another worker, just after it, finished its run:
    its checkpoint removed and then the (now empty) shared folder with it. Returns a counter."""
    real_mkdir = Path.mkdir
    calls = [0]

    def mkdir(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if self == folder and calls[0] < times:
            calls[0] += 1
            other = folder / "other-run.pt"
            other.write_bytes(b"")
            discard_checkpoint(other)  # the other worker's clean-up: the folder is empty, so it goes
            assert not folder.exists()

    monkeypatch.setattr(Path, "mkdir", mkdir)
    return calls


def test_save_survives_another_worker_removing_the_folder(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    calls = _other_worker_finishes_right_after_mkdir(monkeypatch, folder)
    path = folder / "run.pt"
    save_checkpoint(path, {"key": "k", "epoch": 3, "w": torch.arange(4.0)})
    assert calls[0] == 1  # the race really happened
    state = load_checkpoint(path, torch.device("cpu"), ("key", "k"), print)
    assert state is not None and state["epoch"] == 3 and torch.equal(state["w"], torch.arange(4.0))
    assert sorted(p.name for p in folder.iterdir()) == ["run.pt"]  # no temporary file left behind


def test_save_gives_up_after_its_attempts(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    _other_worker_finishes_right_after_mkdir(monkeypatch, folder, times=100)
    with pytest.raises(FileNotFoundError):
        save_checkpoint(folder / "run.pt", {"key": "k"}, attempts=3)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "run.pt"
    save_checkpoint(path, {"key": "k", "epoch": 1})

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(checkpoints.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"key": "k", "epoch": 2})
    monkeypatch.undo()
    state = load_checkpoint(path, torch.device("cpu"), ("key", "k"), print)
    assert state is not None and state["epoch"] == 1


def test_discard_keeps_a_folder_that_other_runs_still_use(tmp_path):
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder / "a.pt", {"key": "a"})
    save_checkpoint(folder / "b.pt", {"key": "b"})
    discard_checkpoint(folder / "a.pt")
    assert sorted(p.name for p in folder.iterdir()) == ["b.pt"]
    discard_checkpoint(folder / "b.pt")
    assert not folder.exists()
    discard_checkpoint(folder / "b.pt")  # twice, or after the folder went: nothing to do, no error

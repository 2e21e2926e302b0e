"""What changes a run's numbers besides its settings: precision, memory format and CPU threads.

Two runs with the same settings give the same numbers on the CPU only when they also train in the
same precision, memory format and number of threads (threads split float sums differently). A
config names them in three fields; a field left ``None`` keeps the behaviour from before these
fields existed (bf16 autocast and channels_last on CUDA only; cores // jobs threads) and stays out
of the run's key, so older results keep their keys. A run records what it really used in its
``environment``, and a grid that would resume next to runs made with other numerics says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from ..errors import GammaGuideError

FIELDS = ("precision", "memory_format", "threads")
PRECISIONS = ("float32", "bf16")
MEMORY_FORMATS = ("contiguous", "channels_last")


@dataclass(frozen=True)
class Numerics:
    """The numerics a run trains with, every field resolved."""

    precision: str
    memory_format: str
    threads: int | None  # CPU threads; None on CUDA (they do not change a GPU run's numbers)

    @property
    def channels_last(self) -> bool:
        return self.memory_format == "channels_last"

    def autocast(self, device: torch.device):
        """bf16 autocast on the run's device when the precision asks for it (a no-op otherwise)."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def apply(self, device: torch.device) -> None:
        """Set the process's thread count (a run owns its process, or its worker)."""
        if device.type == "cpu" and self.threads:
            torch.set_num_threads(self.threads)

    def record(self) -> dict[str, Any]:
        return {"precision": self.precision, "memory_format": self.memory_format,
                "threads": self.threads if self.threads else torch.get_num_threads()}


def check(cfg: Any) -> None:
    """The three fields, when given, hold values we know; named as command-line options."""
    precision = getattr(cfg, "precision", None)
    if precision is not None and precision not in PRECISIONS:
        raise GammaGuideError(f"unknown --precision {precision!r}; use {' or '.join(PRECISIONS)}")
    memory_format = getattr(cfg, "memory_format", None)
    if memory_format is not None and memory_format not in MEMORY_FORMATS:
        raise GammaGuideError(f"unknown --memory-format {memory_format!r}; use {' or '.join(MEMORY_FORMATS)}")
    threads = getattr(cfg, "threads", None)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise GammaGuideError(f"--threads must be a whole number >= 1, got {threads!r}")


def resolve(cfg: Any, device: torch.device) -> Numerics:
    """The numerics of ``cfg`` on ``device``; unset fields take the behaviour they had before."""
    cuda = device.type == "cuda"
    precision = getattr(cfg, "precision", None) or ("bf16" if cuda else "float32")
    memory_format = getattr(cfg, "memory_format", None) or ("channels_last" if cuda else "contiguous")
    threads = None if cuda else getattr(cfg, "threads", None)
    return Numerics(precision, memory_format, threads)


def keyed_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the numerics fields left unset: the dict a run's key is made from."""
    return {k: v for k, v in settings.items() if not (k in FIELDS and v is None)}


def default_threads(jobs: int) -> int:
    """The threads a run gets when its config leaves them unset: the machine's cores shared by the
    runs trained at once."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def mixed_threads(records: Iterable[dict[str, Any]], keys: set[str], threads: int) -> dict[int, int]:
    """Threads -> finished runs, for the records of ``keys`` (a grid's runs left unset) made on the CPU
    with another thread count than ``threads``: a resumed grid would mix their numerics."""
    other: dict[int, int] = {}
    for r in records:
        env = r.get("environment") or {}
        used = env.get("threads")
        if r.get("key") in keys and str(env.get("device", "cpu")) == "cpu" and isinstance(used, int) \
                and used != threads:
            other[used] = other.get(used, 0) + 1
    return other

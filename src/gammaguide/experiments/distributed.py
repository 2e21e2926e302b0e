"""Multi-process training on PyTorch's own engine: ``torchrun`` sets the environment, we read it.

Under ``torchrun --nproc_per_node=N -m gammaguide train ...`` every process sees ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; we join the default process group (NCCL on CUDA, gloo on the
CPU), and only rank 0 logs, shows progress and writes results.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import GammaGuideError
from .numerics import default_threads


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GammaGuideError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name != "cpu":
        raise GammaGuideError(f"unknown --device {name!r}; use auto, cpu or cuda")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun; a plain single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cpu":
            # Processes share the machine's cores; oversubscribing them slows every rank down.
            torch.set_num_threads(default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return DistContext(rank, world, local, dev)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        # Leave together: a rank that tears down its gloo connections while a peer still uses
        # them makes that peer's gloo thread throw, which aborts the peer (SIGABRT).
        dist.barrier()
        dist.destroy_process_group()


def all_sum(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor of counters over all ranks (a no-op for one process)."""
    if ctx.distributed:
        values = values.clone()
        dist.all_reduce(values)
    return values


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def load_once(ctx: DistContext, task: Any, cfg: Any, data_dir: str | None = None, *, progress: bool = True) -> Any:
    """``task.load(cfg)``: rank 0 decodes the dataset (or reads its cache) first; the other ranks then
    read the cache rather than decoding the same files at the same time."""
    if ctx.is_main:
        data = task.load(cfg, data_dir, progress=progress)
    barrier(ctx)
    if not ctx.is_main:
        data = task.load(cfg, data_dir, progress=False)
    return data


def worker_context(device: str, jobs: int) -> tuple[DistContext, Callable[[str], None]]:
    """For a worker process of ``--jobs``: its share of the threads (jobs at once must not
    oversubscribe the cores), its device, and a log that says which worker speaks."""
    torch.set_num_threads(default_threads(jobs))
    pid = os.getpid()

    def log(msg: str) -> None:
        print(f"[worker {pid}] {msg}", flush=True)

    return DistContext(0, 1, 0, pick_device(device)), log


def run_workers(worker: Callable, items: list, args: tuple, jobs: int, results: Path) -> None:
    """``--jobs``: ``worker(queue, *args)`` in up to ``jobs`` spawned processes that take
    ``items`` from one queue until a ``None`` each; a failed worker is an error once all have
    stopped (what they finished is already in ``results``)."""
    spawn = mp.get_context("spawn")
    queue: Any = spawn.Queue()
    for item in items:
        queue.put(item)
    workers = [spawn.Process(target=worker, args=(queue, *args)) for _ in range(min(jobs, len(items)))]
    for w in workers:
        queue.put(None)
        w.start()
    for w in workers:
        w.join()
    bad = [w.exitcode for w in workers if w.exitcode]
    if bad:
        raise GammaGuideError(f"{len(bad)} worker process(es) failed (exit codes {bad}); finished runs are in "
                              f"{results}; rerun the same command to do the rest")

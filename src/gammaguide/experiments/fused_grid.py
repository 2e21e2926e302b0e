"""An ablation grid trained in fused groups (``ablate --fuse N``): grouping, sizing, running.

Groups are cut, in grid order, from the unfinished runs that share every setting but policy and
seed, into groups of at most N of as even a size as possible. Each group checkpoints every epoch
to ``group-<key>.pt`` (the key names its runs). A rerun first takes up every checkpoint whose
runs all belong to this shard, as the group it was, whatever N or the finished runs are now
(runs of it written meanwhile ride along and are not written again), then groups the rest. So a
killed grid loses no run and writes none twice. Each finished group appends one line per run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..errors import GammaGuideError
from .data import Dataset, load_dataset
from .distributed import DistContext, run_workers
from .results import RESULTS_NAME, append_line
from .train import RunRecord, TrainConfig

# ``--fuse auto`` on the CPU: fuse only where fusing was measured to be faster than separate runs
# (bench/grid_throughput.py and timed smoke grids; the numbers are in docs/fused.md). On the 2-core
# machine it was not shown faster for ResNet-20 at batch 128 or for the smoke protocol, with 1 or 2
# threads (with 2 threads it was much slower), so auto trains runs alone on the CPU.
CPU_AUTO = 1
CUDA_MAX_GROUP = 40  # the largest group scripts/gpu_fused.sh probes; larger ones are untested


def parse_fuse(text: str | int | None) -> str | int:
    """``auto`` or a positive integer."""
    if text is None or text == "auto":
        return "auto"
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise GammaGuideError(f"bad --fuse {text!r}: give the most runs to train as one network (1: each alone), "
                              f"or auto")
    return value


def make_groups(configs: list[TrainConfig], size: int) -> list[list[TrainConfig]]:
    """Runs that may fuse (same settings but policy and seed), in order, cut into groups of at
    most ``size`` of as even a size as possible."""
    from .fused_train import shared_settings

    buckets: dict[str, list[TrainConfig]] = {}
    for c in configs:
        buckets.setdefault(json.dumps(shared_settings(c), sort_keys=True, default=str), []).append(c)
    out = []
    for runs in buckets.values():
        parts = math.ceil(len(runs) / size)
        base, extra = divmod(len(runs), parts)
        start = 0
        for i in range(parts):
            end = start + base + (i < extra)
            out.append(runs[start:end])
            start = end
    return out


# ----------------------------------------------------------------------------- how many runs a group holds


def resolve_fuse(fuse: str | int, base: TrainConfig, runs: int, jobs: int, ctx: DistContext,
                 data_dir: str | None = None, log: Callable[[str], None] = print) -> int:
    """The group size ``--fuse`` asks for: 1 under torchrun (a group is one process), an integer
    as given, ``auto`` as ``auto_group_size`` measures it."""
    if ctx.distributed:
        if fuse not in ("auto", 1):
            raise GammaGuideError(f"--fuse {fuse} trains a group in one process; under torchrun use --fuse 1")
        return 1
    if fuse != "auto":
        return int(fuse)
    if ctx.device.type != "cuda":
        return min(CPU_AUTO, max(runs, 1))
    return auto_group_size(base, runs, jobs, ctx.device, load_dataset(base.data, data_dir, progress=False), log)


def auto_group_size(base: TrainConfig, runs: int, jobs: int, device: torch.device, data: Dataset,
                    log: Callable[[str], None] = print) -> int:
    """``--fuse auto``: on CUDA as many runs as the GPU's memory holds (measured: the peak memory
    of training steps of a group of one and of two runs gives the cost of each further run),
    shared among ``jobs`` processes; on the CPU ``CPU_AUTO``."""
    if runs <= 1:
        return 1
    from .fused_train import FusedTrainer

    peaks = []
    ctx = DistContext(0, 1, 0, device)
    for n in (1, 2):
        configs = [replace(base, seed=base.seed + i, epochs=1000) for i in range(n)]
        trainer = FusedTrainer(configs, data, ctx, progress=False)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        batches = trainer.epoch_batches(0)
        for _ in range(2):
            x, y = next(batches)
            trainer.forward_backward(x, y)
            trainer.optimizer_step()
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device))
        del trainer, batches
        torch.cuda.empty_cache()
    per_run = max(peaks[1] - peaks[0], 1)
    fixed = max(peaks[0] - per_run, 0)
    free, _ = torch.cuda.mem_get_info(device)
    fits = int((0.8 * free / max(jobs, 1) - fixed) // per_run)
    size = max(1, min(runs, fits, CUDA_MAX_GROUP))
    log(f"--fuse auto: a run adds {per_run / 2**20:.0f} MiB to a group; {free / 2**30:.1f} GiB free for {jobs} "
        f"process(es) -> groups of up to {size}")
    return size


# ----------------------------------------------------------------------------- running the groups


def plan_groups(configs: list[TrainConfig], done: set[str], checkpoints: Path, size: int) -> list[list[TrainConfig]]:
    """The groups to train: those of the checkpoints found (see the module's docstring), then
    the other unfinished runs of ``configs`` in groups of at most ``size``."""
    from .fused_train import checkpoint_members

    pool = {c.key(): c for c in configs}
    adopted = []
    for path in sorted(checkpoints.glob("group-*.pt")) if checkpoints.is_dir() else []:
        members = checkpoint_members(path)
        if not members or any(k not in pool for k in members):
            continue  # another shard's or another grid's, or unreadable
        if all(k in done for k in members):
            path.unlink(missing_ok=True)  # killed after writing every line, before removing it
            continue
        adopted.append([pool.pop(k) for k in members])
    rest = [c for c in configs if c.key() in pool and c.key() not in done]
    return adopted + (make_groups(rest, size) if rest else [])


def run_groups(configs: list[TrainConfig], done: set[str], out: Path, checkpoints: Path, size: int, *,
               data_dir: str | None, ctx: DistContext, device: str, jobs: int = 1, compile: bool = False,
               progress: bool = True, log: Callable[[str], None] = print) -> None:
    """Train the unfinished runs of ``configs`` (a shard's list) in fused groups of at most ``size``."""
    todo = plan_groups(configs, done, checkpoints, size)
    log(f"{len(todo)} fused group(s) of up to {size} runs")
    if jobs <= 1 or len(todo) <= 1:
        for i, group in enumerate(todo):
            log(f"group {i + 1}/{len(todo)}: {len(group)} runs")
            _run_group(group, done, out, checkpoints, data_dir, ctx, compile, progress, log)
        return
    items = [(group, {c.key() for c in group} & done) for group in todo]
    run_workers(_worker, items, (str(out), str(checkpoints), data_dir, device, jobs, compile), jobs,
                out / RESULTS_NAME)


def _run_group(group: list[TrainConfig], written: set[str], out: Path, checkpoints: Path, data_dir: str | None,
               ctx: DistContext, compile: bool, progress: bool, log: Callable[[str], None]) -> None:
    """Train one group and append the lines of its runs not ``written`` already."""
    from .ablate import failed_record
    from .fused_train import FusedTrainer, group_key

    results = out / RESULTS_NAME
    data = load_dataset(group[0].data, data_dir, progress=False)
    try:
        trainer = FusedTrainer(group, data, ctx, checkpoint=checkpoints / f"group-{group_key(group)}.pt",
                               progress=progress, compile=compile, log=log)
        records = trainer.run()
    except GammaGuideError:
        raise  # a bad setting fails every run alike: stop the grid and say so
    except Exception as exc:  # this group broke; record why for each of its runs and go on
        records = [failed_record(c, f"{type(exc).__name__}: {exc}") for c in group]
        trainer = None
    _write([r for r in records if r.key not in written], results, log)
    if trainer is not None:
        trainer.discard_checkpoint()


def _write(records: list[RunRecord], results: Path, log: Callable[[str], None]) -> None:
    for record in records:
        append_line(results, record.to_json())
        log(f"  -> {record.arm} seed {record.seed}: {record.status}"
            + (f", test accuracy {record.test_acc:.4f}" if record.test_acc is not None else f" ({record.reason})"))


def _worker(queue, out: str, checkpoints: str, data_dir: str | None, device: str, jobs: int, compile: bool) -> None:
    from .distributed import worker_context

    ctx, log = worker_context(device, jobs)
    while True:
        item = queue.get()
        if item is None:
            return
        group, written = item
        _run_group(group, written, Path(out), Path(checkpoints), data_dir, ctx, compile, False, log)


# ----------------------------------------------------------------------------- throughput probe


def probe_rate(base: TrainConfig, size: int, device: torch.device, data: Dataset, seconds: float,
               compile: bool = False, start_line=None) -> float:
    """Training images/s of one fused group of ``size`` runs (all runs together), after a warm-up."""
    from .fused_train import FusedTrainer

    configs = [replace(base, seed=base.seed + i, epochs=1000) for i in range(size)]
    trainer = FusedTrainer(configs, data, DistContext(0, 1, 0, device), progress=False, compile=compile)
    trainer.steps_per_epoch = chunk = min(20, trainer.steps_per_epoch)
    trainer.train_epoch(0)  # warm-up: cuDNN autotuning, allocator, compilation
    if start_line is not None:
        start_line.wait()
    images, epoch, start = 0, 1, time.perf_counter()
    while time.perf_counter() - start < seconds:
        trainer.train_epoch(epoch)
        images += chunk * base.batch_size * size
        epoch += 1
    return images / (time.perf_counter() - start)

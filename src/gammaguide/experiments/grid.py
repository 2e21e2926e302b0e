"""The ablation grid: arms x seeds, each run trained by ``trainer.Trainer``, resumable and shardable.
It does not know which task it runs: the task comes with each config (``tasks.for_config``).

Every finished run is appended at once to ``OUT/results.jsonl``; a rerun of the same command
skips the runs already there, and a run killed mid-way resumes from its last epoch's checkpoint
in ``OUT/checkpoints/``. ``shard=(i, n)`` takes every n-th run of the grid, starting at the i-th,
so n machines (or a cluster job array) can share one grid; their results files merge by
concatenation. ``jobs > 1`` trains that many units at once in worker processes (one GPU is far
larger than one small ResNet needs).

A unit is one run, or with ``fuse > 1`` a group of runs that share every setting but their policy
and seed, trained as one fused network (docs/fused.md). Groups are cut, in grid order, into
groups of at most N of as even a size as possible. A rerun first takes up every group checkpoint
(``group-<key>.pt``) whose runs all belong to this shard, as the group it was, whatever N or the
finished runs are now (runs of it written meanwhile ride along and are not written again), then
groups the rest: a killed grid loses no run and writes none twice.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import GammaGuideError
from . import numerics
from .checkpoints import checkpoint_members
from .distributed import DistContext, barrier, load_once, pick_device, run_workers, worker_context
from .network import group_key, shared_settings
from .results import RESULTS_NAME, append_line, finished_keys, read_lines
from .tasks import for_config
from .trainer import Trainer, failed_record, score

# ``--fuse auto`` on the CPU: fuse only where fusing was measured to be faster than separate runs
# (bench/grid_throughput.py and timed smoke grids; the numbers are in docs/fused.md). On the 2-core
# machine it was not shown faster for ResNet-20 at batch 128 or for the smoke protocol, with 1 or 2
# threads (with 2 threads it was much slower), so auto trains runs alone on the CPU.
CPU_AUTO = 1
CUDA_MAX_GROUP = 40  # the largest group scripts/gpu_fused.sh probes; larger ones are untested

Unit = Any  # a config (one run) or a list of configs (a fused group)


def grid(base: Any, arms: tuple[str, ...], seeds: tuple[int, ...]) -> list:
    """Seed-major order: every arm of seed 0 comes before seed 1, so a grid cut short still
    holds complete pairs."""
    return [replace(base, policy=arm, seed=seed) for seed in seeds for arm in arms]


def run_grid(configs: list, out: str | os.PathLike, *, data_dir: str | None = None, device: str = "auto",
             shard: tuple[int, int] = (0, 1), jobs: int = 1, retry_failed: bool = False, progress: bool = True,
             ctx: DistContext | None = None, checkpoints: str | os.PathLike | None = None,
             log: Callable[[str], None] = print, fuse: int = 1, compile: bool = False) -> list:
    """Run the configs of this shard that are not finished yet; returns those it ran.

    Under torchrun (``ctx`` distributed) every rank walks the same list and each run is one
    DistributedDataParallel run; rank 0 alone writes. ``fuse > 1`` trains runs that differ only
    in policy and seed in groups of up to ``fuse`` as one network (``compile`` applies
    ``torch.compile`` to each group)."""
    out = Path(out)
    results = out / RESULTS_NAME
    ckpt = Path(checkpoints) if checkpoints else out / "checkpoints"
    ctx = ctx or DistContext(0, 1, 0, pick_device(device))
    mine = configs[shard[0]::shard[1]]
    done = finished_keys(results, retry_failed=retry_failed)
    barrier(ctx)  # every rank has read the file before rank 0 appends to it
    todo = [c for c in mine if c.key() not in done]
    if ctx.is_main:
        log(f"{len(mine)} runs in this shard, {len(mine) - len(todo)} already in {results}, {len(todo)} to run")
        if todo and ctx.device.type == "cpu":
            _warn_mixed_threads(mine, results, numerics.default_threads(jobs) if jobs > 1 else torch.get_num_threads(),
                                log)
    if not todo:
        return []
    # Decode (or read the cache) once here, so that workers and other ranks only read the cache.
    load_once(ctx, for_config(todo[0]), todo[0], data_dir, progress=progress)
    units: list[Unit] = plan_groups(mine, done, ckpt, fuse) if fuse > 1 else todo
    if fuse > 1:
        log(f"{len(units)} fused group(s) of up to {fuse} runs")
    # Lone runs go to worker processes whenever jobs > 1 (their threads are the cores // jobs that
    # _warn_mixed_threads assumes); a single fused group trains in this process.
    if jobs <= 1 or (fuse > 1 and len(units) <= 1):
        for i, unit in enumerate(units):
            if ctx.is_main:
                log(f"run {i + 1}/{len(units)}: " + (f"{unit.policy} seed {unit.seed}" if not isinstance(unit, list)
                                                     else f"a fused group of {len(unit)} runs"))
            _run_unit(unit, done, out, ckpt, data_dir, ctx, compile, progress, log)
        return todo
    items = [(u, {c.key() for c in (u if isinstance(u, list) else [u])} & done) for u in units]
    run_workers(_worker, items, (str(out), str(ckpt), data_dir, device, jobs, compile), jobs, results)
    return todo


def _warn_mixed_threads(configs: list, results: Path, threads: int, log: Callable[[str], None]) -> None:
    """Runs whose config leaves ``threads`` unset train with this invocation's share of the cores; say
    so when finished runs of the same grid were made with another count (their numbers differ)."""
    unset = {c.key() for c in configs if getattr(c, "threads", None) is None}
    if not unset:
        return
    other = numerics.mixed_threads(read_lines(results, warn=False), unset, threads)
    if other:
        made = ", ".join(f"{n} with {t} thread{'s' * (t != 1)}" for t, n in sorted(other.items()))
        log(f"warning: finished runs of this grid were made with other CPU thread counts ({made}); the runs "
            f"left will train with {threads}, and thread counts change float sums: to keep the grid's numerics "
            f"one, give --threads {max(other, key=other.get)} (it then starts a new grid), or --jobs to match")


def _run_unit(unit: Unit, written: set[str], out: Path, checkpoints: Path, data_dir: str | None, ctx: DistContext,
              compile: bool, progress: bool, log: Callable[[str], None]) -> None:
    """Train one run or group and append the lines of its runs not ``written`` already; a run that
    breaks is a failed line saying why, and the grid goes on."""
    group = unit if isinstance(unit, list) else [unit]
    data = for_config(group[0]).load(group[0], data_dir, progress=False)
    name = f"group-{group_key(unit)}.pt" if isinstance(unit, list) else f"{unit.key()}.pt"
    trainer = None
    try:
        trainer = Trainer(unit, data, ctx, checkpoint=checkpoints / name, progress=progress, compile=compile, log=log)
        records = trainer.run()
    except GammaGuideError:
        raise  # a bad setting fails every run alike: stop the grid and say so
    except Exception as exc:  # this unit broke; record why and go on with the grid
        if ctx.distributed:
            raise  # the other ranks cannot go on alone
        records = [failed_record(c, f"{type(exc).__name__}: {exc}") for c in group]
        trainer = None
    if not ctx.is_main:
        return
    for record in records if isinstance(records, list) else [records]:
        if record.key not in written:
            append_line(out / RESULTS_NAME, record.to_json())
            log(f"  -> {record.arm} seed {record.seed}: {record.status}"
                + (f", {score(record)}" if record.status == "ok" else f" ({record.reason})"))
    if trainer is not None:
        trainer.discard_checkpoint()


def _worker(queue, out: str, checkpoints: str, data_dir: str | None, device: str, jobs: int, compile: bool) -> None:
    ctx, log = worker_context(device, jobs)
    while True:
        item = queue.get()
        if item is None:
            return
        unit, written = item
        _run_unit(unit, written, Path(out), Path(checkpoints), data_dir, ctx, compile, False, log)


# ----------------------------------------------------------------------------- fused groups


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


def make_groups(configs: list, size: int) -> list[list]:
    """Runs that may fuse (same settings but policy and seed), in order, cut into groups of at
    most ``size`` of as even a size as possible."""
    buckets: dict[str, list] = {}
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


def plan_groups(configs: list, done: set[str], checkpoints: Path, size: int) -> list[list]:
    """The groups to train: those of the checkpoints found (see the module's docstring), then
    the other unfinished runs of ``configs`` in groups of at most ``size``."""
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


def resolve_fuse(fuse: str | int, base: Any, runs: int, jobs: int, ctx: DistContext, data_dir: str | None = None,
                 log: Callable[[str], None] = print, compile: bool = False) -> int:
    """The group size ``--fuse`` asks for: 1 under torchrun (a group is one process) and for a task
    that does not fuse, an integer as given, ``auto`` as ``auto_group_size`` measures it."""
    if not for_config(base).fusable:
        if fuse not in ("auto", 1) or compile:
            raise GammaGuideError("--fuse and --compile fuse image grids (BatchNorm ResNets); text grids train each "
                                  "run alone: leave them out, and use --jobs N for runs at once")
        return 1
    if ctx.distributed:
        if fuse not in ("auto", 1):
            raise GammaGuideError(f"--fuse {fuse} trains a group in one process; under torchrun use --fuse 1")
        return 1
    if fuse != "auto":
        return int(fuse)
    if ctx.device.type != "cuda":
        return min(CPU_AUTO, max(runs, 1))
    return auto_group_size(base, runs, jobs, ctx.device, for_config(base).load(base, data_dir, progress=False), log)


def auto_group_size(base: Any, runs: int, jobs: int, device: torch.device, data: Any,
                    log: Callable[[str], None] = print) -> int:
    """``--fuse auto`` on CUDA: as many runs as the GPU's memory holds (measured: the peak memory
    of training steps of a group of one and of two runs gives the cost of each further run),
    shared among ``jobs`` processes."""
    if runs <= 1:
        return 1
    peaks = []
    ctx = DistContext(0, 1, 0, device)
    for n in (1, 2):
        configs = [replace(base, seed=base.seed + i, epochs=1000) for i in range(n)]
        trainer = Trainer(configs, data, ctx, progress=False)
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


# ----------------------------------------------------------------------------- sizing to a budget


def auto_epochs(base: Any, runs: int, jobs: int, budget_s: float, *, data_dir: str | None = None,
                device: str = "auto", probe_s: float = 20.0, floor: int = 1, log: Callable[[str], None] = print,
                fuse: int = 1, compile: bool = False) -> int:
    """Epochs that let ``runs`` runs, ``jobs`` units at a time, finish within ``budget_s`` seconds.

    ``jobs`` processes train at once for ``probe_s`` seconds (at most a tenth of the budget; what
    the grid will do: with ``fuse > 1`` each trains a fused group of that many runs) and then time
    one evaluation each (the per-epoch metric and the mechanisms); 15% is left for start-up and the
    final evaluation on the whole test set."""
    probe_s = min(probe_s, budget_s / 10)  # a short budget is not spent on measuring
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    start_line = ctx.Barrier(jobs)
    size = min(fuse, runs)
    procs = [ctx.Process(target=_probe, args=(base, data_dir, device, jobs, probe_s, start_line, results, size,
                                              compile)) for _ in range(jobs)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    probes = _collect(results, procs)
    steps_s = sum(s for s, _, _ in probes) / len(probes)
    eval_s = max(e for _, e, _ in probes)
    per_epoch = probes[0][2] / steps_s + eval_s  # one unit while `jobs` share the device
    waves = math.ceil(math.ceil(runs / size) / jobs)
    left = budget_s - (time.perf_counter() - start)
    epochs = max(floor, int(0.85 * left / waves / per_epoch))
    fused = f" (fused groups of {size})" if size > 1 else ""
    log(f"probe: {jobs} processes train {steps_s:.1f} steps/s each{fused} and evaluate in {eval_s:.1f} s; one epoch "
        f"{per_epoch:.1f} s; {runs} runs in {waves} wave(s) -> {epochs} epochs fit in {left:.0f} s")
    return epochs


def _collect(results, procs) -> list:
    """One answer from each probe process; a probe that dies is an error, not a hang."""
    import queue as queue_module

    answers: list = []
    while len(answers) < len(procs):
        try:
            answers.append(results.get(timeout=5))
        except queue_module.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise GammaGuideError(f"the throughput probe failed in {len(dead)} process(es) (exit codes {dead}); "
                                      f"see the error above, or give --epochs N instead of auto") from None
    for p in procs:
        p.join()
    return answers


def _probe(base: Any, data_dir, device, jobs, seconds, start_line, results, size=1, compile=False) -> None:
    """(steps/s, seconds of one measurement, steps of a whole epoch) of one unit of the grid."""
    torch.set_num_threads(numerics.default_threads(jobs))
    data = for_config(base).load(base, data_dir, progress=False)
    unit = (replace(base, epochs=1000) if size <= 1
            else [replace(base, seed=base.seed + i, epochs=1000) for i in range(size)])
    trainer = Trainer(unit, data, DistContext(0, 1, 0, pick_device(device)), progress=False, compile=compile)
    full = trainer.steps_per_epoch
    trainer.steps_per_epoch = chunk = min(20, full)  # short slices, to end on time
    trainer.train_epoch(0)  # warm-up: kernels, allocator, compilation
    start_line.wait()  # measure only while all jobs train at once
    steps, epoch, start = 0, 1, time.perf_counter()
    while time.perf_counter() - start < seconds:
        trainer.train_epoch(epoch)
        steps += chunk
        epoch += 1
    rate = steps / (time.perf_counter() - start)
    start = time.perf_counter()
    zeros = 0.0 if size <= 1 else [0.0] * size
    trainer.measure(1, zeros, zeros, 0.0)  # the per-epoch metric and mechanisms
    results.put((rate, time.perf_counter() - start, full))

"""The ablation: a grid of arms x seeds, each a training run, resumable and shardable.

Every finished run is appended at once to ``OUT/results.jsonl``; a rerun of the same command
skips the runs already there, and a run killed mid-way resumes from its last epoch's
checkpoint in ``OUT/checkpoints/``. ``shard=(i, n)`` takes every n-th run of the grid, starting
at the i-th, so n machines (or a cluster job array) can share one grid; their results files
merge by concatenation. ``jobs > 1`` runs that many runs at once in worker processes (one GPU
is far larger than one small ResNet needs).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..errors import GammaGuideError
from ..policy import resolve_policy
from .data import load_dataset
from .distributed import DistContext, barrier, load_dataset_once, run_workers
from . import numerics
from .results import RESULTS_NAME, append_line, finished_keys, read_lines
from .text_train import TextConfig, TextRunRecord, TextTrainer, load_data
from .text_train import failed_record as text_failed_record
from .train import RunRecord, TrainConfig, Trainer

ARMS = ("no_gamma", "only:residual_last", "only:scale_invariant", "only:shortcut", "only:stream",
        "guidelines", "all", "no_norm")


@dataclass(frozen=True)
class Protocol:
    """Defaults of an ablation; every field can be overridden on the command line."""

    name: str
    config: TrainConfig
    seeds: tuple[int, ...]
    about: str
    arms: tuple[str, ...] | None = None  # None: ARMS (or, for text, the arms that differ for the model)


_D2 = TrainConfig(model="resnet20", epochs=10, weight_decay=1e-2, schedule="onecycle", epoch_test_subset=2000,
                  precision="bf16", memory_format="channels_last", threads=1)

PROTOCOLS = {
    "smoke": Protocol("smoke", TrainConfig(model="resnet20", epochs=1, subset=320, test_subset=200, batch_size=64,
                                           variance_batch=32), (0,),
                      "a few hundred images, one epoch: checks that everything runs (tests use it)"),
    # Chosen by the pilot in results/cifar10-resnet20-cpu/README.md.
    "cpu": Protocol("cpu", TrainConfig(model="resnet20", epochs=15, subset=10_000, weight_decay=5e-3,
                                       schedule="onecycle", epoch_test_subset=2000), (0, 1, 2),
                    "8 arms x 3 paired seeds in about 2 hours on 2 CPU cores"),
    "gpu": Protocol("gpu", TrainConfig(model="resnet56", epochs=30, weight_decay=5e-4, schedule="cosine"), (0, 1),
                    "the paper's scale: full training set, deep ResNets; several runs at once on one GPU"),
    # Issue 20's pre-registered CPU grids (results/*-resnet20-d2/PROTOCOL.md): decay time D = 1.97,
    # the standard 200-epoch CIFAR recipe's, in 10 epochs; the fast path, one thread a run (--jobs 2).
    "cifar100-d2": Protocol("cifar100-d2", _D2, tuple(range(8)),
                            "CIFAR-100 (cifar100:PATH), all 50,000 images, ResNet-20, 10 epochs, weight decay 1e-2 "
                            "(D = 1.97), bf16 + channels_last, one thread a run: 7 arms x 8 paired seeds",
                            arms=ARMS[:-1]),
    "cifar10-d2": Protocol("cifar10-d2", _D2, tuple(range(8)),
                           "CIFAR-10, the same model and schedule as cifar100-d2: 4 arms x 8 paired seeds",
                           arms=("no_gamma", "only:residual_last", "guidelines", "all")),
    # Text tasks (text_train.py): AdamW with decoupled weight decay, warm-up then decay.
    "sst2-smoke": Protocol("sst2-smoke", TextConfig(data="sst2", epochs=1, subset=320, test_subset=100, batch_size=32,
                                                    width=32, layers=1, heads=2, vocab_size=300, max_len=32,
                                                    variance_batch=16), (0,),
                           "SST-2, a few hundred phrases, a tiny classifier, one epoch: checks that everything runs"),
    # Sized by the pilot in results/sst2-textcls_preln-cpu/README.md; --model textcls_postln for the post-LN grid.
    "sst2-cpu": Protocol("sst2-cpu", TextConfig(data="sst2", epochs=3, batch_size=64, lr=1e-3, weight_decay=0.1,
                                                schedule="linear", warmup_epochs=0.1, width=128, layers=2, heads=4),
                         (0, 1, 2), "SST-2, all 67,349 phrases, 3 epochs, a 2-layer width-128 classifier: 4 arms x "
                                    "3 paired seeds per model, both models in about 2 hours on 2 CPU cores"),
    # fairseq's transformer_iwslt_de_en recipe (post-LN, AdamW betas 0.9/0.98, lr 5e-4, label smoothing
    # 0.1, dropout 0.3) at width 256 and 3+3 layers, with the CPU protocol's weight decay 0.1 (the
    # recipe's 1e-4 would not move a γ within a run); --model seq2seq_preln for the pre-LN grid.
    "multi30k-gpu": Protocol("multi30k-gpu", TextConfig(model="seq2seq_postln", data="multi30k", epochs=20,
                                                        batch_size=128, lr=5e-4, beta2=0.98, weight_decay=0.1,
                                                        schedule="cosine", warmup_epochs=1.0, label_smoothing=0.1,
                                                        width=256, layers=3, heads=4, dropout=0.3, max_len=128,
                                                        epoch_test_subset=200), (0, 1, 2),
                             "Multi30k De-En, all 29,000 pairs, a 3+3-layer width-256 translator; several runs at "
                             "once on one GPU (--jobs, --epochs auto --time-budget S)"),
    "multi30k-smoke": Protocol("multi30k-smoke", TextConfig(model="seq2seq_postln", data="multi30k", epochs=1,
                                                            subset=320, test_subset=50, batch_size=32, width=32,
                                                            layers=1, heads=2, vocab_size=300, max_len=48,
                                                            label_smoothing=0.1, schedule="cosine", dropout=0.1,
                                                            variance_batch=16), (0,),
                               "Multi30k, a few hundred pairs, a tiny translator, one epoch: checks that everything "
                               "runs"),
}


def parse_arms(text: str | None) -> tuple[str, ...]:
    if not text:
        return ARMS
    arms = tuple(a.strip() for a in text.split(",") if a.strip())
    for a in arms:
        resolve_policy(a)
    if len(set(arms)) != len(arms):
        raise GammaGuideError(f"--arms lists an arm twice: {text}")
    return arms


def parse_seeds(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if not text:
        return default
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        seeds = ()
    if not seeds or any(s < 0 for s in seeds):
        raise GammaGuideError(f"bad --seeds {text!r}: give non-negative integers separated by commas, e.g. 0,1,2")
    return seeds


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if n < 1 or not 0 <= i < n:
        raise GammaGuideError(f"bad --shard {text!r}: write i/n with 0 <= i < n, e.g. 0/4 for the first of 4")
    return i, n


def grid(base: TrainConfig, arms: tuple[str, ...], seeds: tuple[int, ...]) -> list[TrainConfig]:
    """Seed-major order: every arm of seed 0 comes before seed 1, so a grid cut short still
    holds complete pairs."""
    return [replace(base, policy=arm, seed=seed) for seed in seeds for arm in arms]


def run_grid(configs: list[TrainConfig], out: str | os.PathLike, *, data_dir: str | None = None,
             device: str = "auto", shard: tuple[int, int] = (0, 1), jobs: int = 1, retry_failed: bool = False,
             progress: bool = True, ctx: DistContext | None = None, checkpoints: str | os.PathLike | None = None,
             log: Callable[[str], None] = print, fuse: int = 1, compile: bool = False) -> list[TrainConfig]:
    """Run the configs of this shard that are not finished yet; returns those it ran.

    Under torchrun (``ctx`` distributed) every rank walks the same list and each run is one
    DistributedDataParallel run; rank 0 alone writes. ``fuse > 1`` trains runs that differ only
    in policy and seed in groups of up to ``fuse`` as one network (``fused_grid``; ``compile``
    applies ``torch.compile`` to each group)."""
    from .distributed import pick_device

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
    if isinstance(todo[0], TextConfig):
        from .text_train import prepare

        prepare(todo[0], data_dir, progress=progress)
    else:
        load_dataset_once(ctx, todo[0].data, data_dir, progress=progress)
    if fuse > 1:
        from .fused_grid import run_groups

        run_groups(mine, done, out, ckpt, fuse, data_dir=data_dir, ctx=ctx, device=device, jobs=jobs,
                   compile=compile, progress=progress, log=log)
        return todo
    if jobs <= 1:
        for i, cfg in enumerate(todo):
            if ctx.is_main:
                log(f"run {i + 1}/{len(todo)}: {cfg.policy} seed {cfg.seed}")
            _run_one(cfg, out, ckpt, data_dir, ctx, progress, log)
        return todo
    run_workers(_worker, todo, (str(out), str(ckpt), data_dir, device, jobs), jobs, results)
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


def _run_one(cfg: TrainConfig | TextConfig, out: Path, checkpoints: Path, data_dir: str | None, ctx: DistContext,
             progress: bool, log: Callable[[str], None]) -> None:
    """One run of the grid, image or text: a finished line in OUT/results.jsonl, or a failed one saying why."""
    if isinstance(cfg, TextConfig):
        data, make, failed = load_data(cfg, data_dir), TextTrainer, text_failed_record
    else:
        data, make, failed = load_dataset(cfg.data, data_dir, progress=False), Trainer, failed_record
    try:
        trainer = make(cfg, data, ctx, checkpoint=checkpoints / f"{cfg.key()}.pt", progress=progress, log=log)
        record = trainer.run()
    except GammaGuideError:
        raise  # a bad setting fails every run alike: stop the grid and say so
    except Exception as exc:  # this run broke; record why and go on with the grid
        if ctx.distributed:
            raise  # the other ranks cannot go on alone
        record = failed(cfg, f"{type(exc).__name__}: {exc}")
        append_line(out / RESULTS_NAME, record.to_json())
        log(f"  -> {cfg.policy} seed {cfg.seed}: failed ({record.reason})")
        return
    trainer.save_result(record, out / RESULTS_NAME)
    if ctx.is_main:
        log(f"  -> {record.arm} seed {record.seed}: {record.status}{_score(record)}")


def _score(record: RunRecord) -> str:
    """The run's score for the log line, or why it has none."""
    if isinstance(record, TextRunRecord):  # accuracy or BLEU, by the task
        value = record.test_acc if record.metric == "test_acc" else record.test_bleu
        return f", {record.metric} {value:.4f}" if value is not None else f" ({record.reason or 'no score'})"
    return f", test accuracy {record.test_acc:.4f}" if record.test_acc is not None else f" ({record.reason})"


def failed_record(cfg: TrainConfig, reason: str) -> RunRecord:
    return RunRecord(key=cfg.key(), arm=cfg.policy, seed=cfg.seed, status="failed", reason=reason, test_acc=None,
                     model=cfg.model, data=cfg.data, epochs=cfg.epochs, settings=cfg.settings())


def _worker(queue, out: str, checkpoints: str, data_dir: str | None, device: str, jobs: int) -> None:
    from .distributed import worker_context

    ctx, log = worker_context(device, jobs)
    while True:
        cfg = queue.get()
        if cfg is None:
            return
        _run_one(cfg, Path(out), Path(checkpoints), data_dir, ctx, False, log)


# ----------------------------------------------------------------------------- sizing to a budget


def auto_epochs(base: TrainConfig, runs: int, jobs: int, budget_s: float, *, data_dir: str | None = None,
                device: str = "auto", probe_s: float = 20.0, floor: int = 1,
                log: Callable[[str], None] = print, fuse: int = 1, compile: bool = False) -> int:
    """Epochs that let ``runs`` runs, ``jobs`` at a time, finish within ``budget_s`` seconds.

    Measures the aggregate training throughput with ``jobs`` processes training at once (what
    the grid will really do: with ``fuse > 1`` each process trains a fused group of that many
    runs), then leaves 15% for evaluation, measurements and start-up.
    """
    data = load_dataset(base.data, data_dir, progress=False).subset(base.subset, base.test_subset, base.subset_seed)
    n_train, n_test = len(data.train_y), len(data.test_y)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    start_line = ctx.Barrier(jobs)
    size = min(fuse, runs)
    procs = [ctx.Process(target=_probe,
                         args=(base, data_dir, device, jobs, probe_s, start_line, results, size, compile))
             for _ in range(jobs)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    rates = _collect(results, procs)
    total = sum(rates)
    waves = math.ceil(math.ceil(runs / size) / jobs)
    # seconds of one epoch of one run (or fused group of `size` runs) while `jobs` share the device
    per_epoch = size * (n_train + n_test / 3) / (total / jobs)
    left = budget_s - (time.perf_counter() - start)
    epochs = max(floor, int(0.85 * left / (waves * per_epoch)))
    fused = f" (fused groups of {size})" if size > 1 else ""
    log(f"probe: {jobs} processes train {total:.0f} img/s together{fused} ({total / jobs:.0f} each); one epoch "
        f"{per_epoch:.1f} s; {runs} runs in {waves} wave(s) -> {epochs} epochs fit in {left:.0f} s")
    return epochs


def _collect(results, procs) -> list[float]:
    """One number from each probe process; a probe that dies is an error, not a hang."""
    import queue as queue_module

    rates: list[float] = []
    while len(rates) < len(procs):
        try:
            rates.append(results.get(timeout=5))
        except queue_module.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise GammaGuideError(f"the throughput probe failed in {len(dead)} process(es) (exit codes {dead}); "
                                      f"see the error above, or give --epochs N instead of auto") from None
    for p in procs:
        p.join()
    return rates


def _probe(base: TrainConfig, data_dir, device, jobs, seconds, start_line, results, size=1, compile=False) -> None:
    from .distributed import pick_device

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    data = load_dataset(base.data, data_dir, progress=False)
    if size > 1:
        from .fused_grid import probe_rate

        results.put(probe_rate(base, size, pick_device(device), data, seconds, compile, start_line))
        return
    trainer = Trainer(replace(base, epochs=1000), data, DistContext(0, 1, 0, pick_device(device)), progress=False)
    # Short slices of an epoch, so the measuring window can end on time.
    trainer.steps_per_epoch = chunk = min(20, trainer.steps_per_epoch)
    trainer.train_epoch(0)  # warm-up: cuDNN autotuning, allocator
    start_line.wait()  # measure only while all jobs train at once
    images, epoch, start = 0, 1, time.perf_counter()
    while time.perf_counter() - start < seconds:
        trainer.train_epoch(epoch)
        images += chunk * base.batch_size
        epoch += 1
    results.put(images / (time.perf_counter() - start))

"""One training run: a built-in model, a policy's parameter groups, SGD, a schedule, a record.

Pairing: ``seed`` fixes the initial weights (the model is built right after
``torch.manual_seed(seed)``) and, through ``data.epoch_plan``, the order of the batches and every
crop and flip. Two runs that differ only in their policy therefore start from the same weights
and see the same images in the same order.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import analysis, groups
from ..errors import GammaGuideError
from ..models import create_model
from ..policy import resolve_policy
from . import mechanisms, numerics
from .checkpoints import (discard_checkpoint, load_checkpoint, restore_training_state, save_checkpoint,
                          training_state)
from .data import Augment, Dataset, balanced_indices, epoch_plan
from .distributed import DistContext, all_sum, barrier
from .progress import bar as progress_bar
from .results import SCHEMA, append_line, run_key

SCHEDULES = ("cosine", "onecycle")


@dataclass
class TrainConfig:
    """Every setting that defines a run; all of it is recorded with the result."""

    model: str = "resnet20"
    data: str = "cifar10"
    policy: str = "guidelines"
    epochs: int = 15
    seed: int = 0
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    subset: int | None = None
    test_subset: int | None = None
    subset_seed: int = 0
    sync_bn: bool = False
    variance_batch: int = 256  # fixed, class-balanced test images for the variance ratios
    # Test images for the accuracy of every epoch but the last (a fixed, class-balanced part of
    # the test set; None: all of it). The last epoch, whose accuracy is the run's, always uses
    # the whole test set. Saves most of the evaluation time of long CPU runs.
    epoch_test_subset: int | None = None
    # Numerics (numerics.py): bf16 autocast or float32, channels_last or contiguous, CPU threads per
    # run. None: as before these fields existed (bf16 and channels_last on CUDA only, cores // jobs
    # threads), and left out of the key.
    precision: str | None = None
    memory_format: str | None = None
    threads: int | None = None

    def check(self) -> None:
        resolve_policy(self.policy)  # raises with the list of policies
        numerics.check(self)
        if self.schedule not in SCHEDULES:
            raise GammaGuideError(f"unknown --schedule {self.schedule!r}; use {' or '.join(SCHEDULES)}")
        check_counts(self, ("epochs", "batch_size"))
        check_non_negative(self, ("lr", "weight_decay", "momentum", "warmup_epochs"))

    def settings(self) -> dict[str, Any]:
        return numerics.keyed_settings(asdict(self))

    def key(self) -> str:
        return run_key(self.settings())


def check_counts(cfg: Any, names: tuple[str, ...]) -> None:
    """Settings that count something (epochs, batch size, layers): at least 1, named as options."""
    for name in names:
        if getattr(cfg, name) < 1:
            raise GammaGuideError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")


def check_non_negative(cfg: Any, names: tuple[str, ...]) -> None:
    """Rates and lengths (learning rate, weight decay, warm-up): finite and >= 0, named as options."""
    for name in names:
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0:
            raise GammaGuideError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")


@dataclass
class RunRecord:
    """What one run leaves in the results file (as one JSON line)."""

    key: str
    arm: str
    seed: int
    status: str  # "ok" | "failed"
    reason: str | None
    test_acc: float | None
    model: str
    data: str
    epochs: int
    settings: dict[str, Any]
    schema: int = SCHEMA  # the format of this record (results.py); records without one are version 1
    history: list[dict[str, Any]] = field(default_factory=list)
    roles: dict[str, dict[str, int]] = field(default_factory=dict)  # role -> {"count", "decayed"}
    train_images_per_s: float | None = None
    wall_s: float | None = None
    environment: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def lr_factor(step: int, total: int, schedule: str, warmup: int = 0) -> float:
    """Learning-rate multiplier at ``step`` of ``total``.

    cosine: optional linear warm-up, then half a cosine from 1 to 0.
    onecycle: linear from 1/25 to 1 over the first 30% of the steps, then a cosine to 1/25e4
    (the shape of ``torch.optim.lr_scheduler.OneCycleLR``, without its momentum cycling).
    """
    if schedule == "onecycle":
        up = max(1, int(0.3 * total))
        if step < up:
            return 1 / 25 + (1 - 1 / 25) * step / up
        t = (step - up) / max(1, total - up)
        low = 1 / 25e4
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * t))
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def decay_time(factor: Callable[[int], float], lr: float, weight_decay: float, steps: int) -> float:
    """D = the sum over the first ``steps`` steps of lr_t * weight decay: how far L2 has acted (a weight
    decayed alone shrinks by about exp(-D)); below ~1 decay has barely acted."""
    return lr * weight_decay * math.fsum(factor(s) for s in range(steps))


def environment(device: torch.device, world: int, used: "numerics.Numerics | None" = None) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "world_size": world, "threads": torch.get_num_threads(), "host": platform.node()}
    if used is not None:
        env.update(used.record())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _probe_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """The test images whose residual variances every epoch measures: the same for every arm and
    epoch, and class-balanced (a test set stored by class would otherwise give one class)."""
    n = min(n, len(labels))
    try:
        return balanced_indices(labels, n, seed, "test")
    except GammaGuideError:  # fewer images than classes, or a class too small: take them in order
        return torch.arange(n)


class Trainer:
    """The state of one run; ``run()`` trains it to the end (resuming from a checkpoint)."""

    def __init__(self, config: TrainConfig, data: Dataset, ctx: DistContext, *,
                 checkpoint: str | os.PathLike | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None):
        config.check()
        self.cfg = config
        self.ctx = ctx
        self.device = ctx.device
        self.cuda = self.device.type == "cuda"
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.progress = progress and ctx.is_main
        self.log = log if ctx.is_main and log is not None else (lambda msg: None)
        if config.sync_bn and ctx.distributed and not self.cuda:
            raise GammaGuideError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm runs only on GPUs under "
                                  "DistributedDataParallel; leave it out on the CPU (each process then normalizes "
                                  "with the statistics of its own share of the batch)")
        if config.batch_size % ctx.world_size:
            raise GammaGuideError(f"--batch-size {config.batch_size} is not divisible by the {ctx.world_size} "
                                  f"processes; use a multiple of {ctx.world_size}")

        data = data.subset(config.subset, config.test_subset, config.subset_seed)
        if len(data.train_y) < config.batch_size:
            raise GammaGuideError(f"the training set has {len(data.train_y)} images, fewer than one batch of "
                                  f"{config.batch_size}; use a larger --subset or a smaller --batch-size")
        self.data = data
        self.train_x = data.train_x.to(self.device)
        self.train_y = data.train_y.to(self.device)
        self.test_x = data.test_x.to(self.device)
        self.test_y = data.test_y.to(self.device)
        self.epoch_test = None
        if config.epoch_test_subset and config.epoch_test_subset < len(data.test_y):
            part = data.subset(None, config.epoch_test_subset, config.subset_seed)
            self.epoch_test = (part.test_x.to(self.device), part.test_y.to(self.device))
        self.numerics = numerics.resolve(config, self.device)
        self.numerics.apply(self.device)
        self.augment = Augment(self.device, channels_last=self.numerics.channels_last)
        probe = _probe_indices(data.test_y, config.variance_batch, config.subset_seed).to(self.device)
        self.variance_x, self.variance_y = self.test_x[probe], self.test_y[probe]

        torch.manual_seed(config.seed)  # the initial weights: the same for every arm of a seed
        model = create_model(config.model, num_classes=data.num_classes)
        if config.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        if self.numerics.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        self.model = model
        example = self.augment.normalize(self.test_x[:2])
        self.report = analysis.analyze(model, example, config.policy, warn=False)
        self.groups = groups.param_groups(model, config.weight_decay, report=self.report, lr=config.lr)
        self.optimizer = torch.optim.SGD(self.groups, lr=config.lr, momentum=config.momentum,
                                         nesterov=config.nesterov, weight_decay=config.weight_decay,
                                         foreach=True)
        self.steps_per_epoch = len(self.train_y) // config.batch_size  # whole batches only
        total = self.steps_per_epoch * config.epochs
        warmup = int(config.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, config.schedule, warmup))
        self.net = model
        if ctx.distributed:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.cuda else None)
        self.role_tensors = mechanisms.role_tensors(model, self.report, self.optimizer)
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.train_seconds = 0.0
        self.train_images = 0
        self._resume()

    # -- checkpoints: a killed run resumes at its last finished epoch ----------------------------
    def _resume(self) -> None:
        state = load_checkpoint(self.checkpoint, self.device, ("key", self.cfg.key()), self.log)
        if state is None:
            return
        restore_training_state(state, self.model, self.optimizer, self.scheduler)
        self.history = state["history"]
        self.start_epoch = state["epoch"]
        self.train_seconds, self.train_images = state["train_seconds"], state["train_images"]
        self.log(f"resuming {self.cfg.policy} seed {self.cfg.seed} after epoch {self.start_epoch}")

    def _save(self, epoch: int) -> None:
        if self.checkpoint is None or not self.ctx.is_main:
            return
        save_checkpoint(self.checkpoint, {
            "key": self.cfg.key(), "epoch": epoch, **training_state(self.model, self.optimizer, self.scheduler),
            "history": self.history, "train_seconds": self.train_seconds, "train_images": self.train_images})

    def save_result(self, record: "RunRecord", results: str | os.PathLike) -> None:
        """Rank 0 appends the finished run to the results file, then drops its checkpoint."""
        if self.ctx.is_main:
            append_line(results, record.to_json())
            self.discard_checkpoint()

    def discard_checkpoint(self) -> None:
        if self.checkpoint is not None and self.ctx.is_main:
            discard_checkpoint(self.checkpoint)

    # -- one epoch ----------------------------------------------------------------------------------
    def _local_order(self, epoch: int, plan_order: torch.Tensor) -> torch.Tensor:
        """This process's share of the epoch: a DistributedSampler over the training images.

        Its permutation is the single-process one, and rank r takes every world-th image, so
        step s of all ranks together covers exactly the single-process batch s."""
        if not self.ctx.distributed:
            return plan_order
        sampler = torch.utils.data.DistributedSampler(range(len(self.train_y)), num_replicas=self.ctx.world_size,
                                                      rank=self.ctx.rank, shuffle=True, seed=self.cfg.seed)
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler))

    def train_epoch(self, epoch: int) -> tuple[float, float, float]:
        """(mean loss, accuracy, images/s) of one epoch; raises FloatingPointError on a
        non-finite loss."""
        cfg = self.cfg
        plan = epoch_plan(len(self.train_y), cfg.seed, epoch)
        order = self._local_order(epoch, plan.order).to(self.device)
        dy, dx, flip = plan.dy.to(self.device), plan.dx.to(self.device), plan.flip.to(self.device)
        local = cfg.batch_size // self.ctx.world_size
        self.net.train()
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)  # loss * n, correct
        n = 0
        bar = progress_bar(self.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", "step",
                           self.progress and sys.stderr.isatty())
        check_every, shown = 20, 0
        start = time.perf_counter()
        for step in range(self.steps_per_epoch):
            idx = order[step * local:(step + 1) * local]
            x = self.augment(self.train_x[idx], dy[idx], dx[idx], flip[idx])
            y = self.train_y[idx]
            with self.numerics.autocast(self.device):
                out = self.net(x)
                loss = F.cross_entropy(out, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            with torch.no_grad():
                sums += torch.stack([loss.detach().double() * len(y), (out.argmax(1) == y).sum().double()])
            n += len(y)
            if (step + 1) % check_every == 0 or step + 1 == self.steps_per_epoch:
                # One host sync every few steps: enough to stop a diverged run early and to
                # show progress, without stalling the device on every step.
                loss_sum, correct = sums.tolist()
                if not math.isfinite(loss_sum):
                    bar.close()
                    raise FloatingPointError(f"non-finite training loss ({loss_sum}) at epoch {epoch + 1}, "
                                             f"step {step + 1}")
                bar.update(step + 1 - shown)
                shown = step + 1
                bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{correct / n:.3f}",
                                img_s=f"{n * self.ctx.world_size / (time.perf_counter() - start):.0f}",
                                refresh=False)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        bar.close()
        counts = torch.cat([sums, torch.tensor([float(n)], device=self.device, dtype=torch.float64)])
        loss_sum, correct, n = all_sum(self.ctx, counts).tolist()
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"non-finite training loss ({loss_sum}) at epoch {epoch + 1}")
        self.train_seconds += seconds
        self.train_images += int(n)
        return loss_sum / n, correct / n, n / seconds

    @torch.no_grad()
    def evaluate(self, last: bool = True) -> tuple[float, int]:
        """(accuracy, images): on the whole test set, or the per-epoch part of it."""
        xs, ys = (self.test_x, self.test_y) if last or self.epoch_test is None else self.epoch_test
        self.model.eval()
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for i in range(0, len(ys), 1000):
            x = self.augment.normalize(xs[i:i + 1000])
            with self.numerics.autocast(self.device):
                correct += (self.model(x).argmax(1) == ys[i:i + 1000]).sum()
        return int(correct) / len(ys), len(ys)

    def measure(self, epoch: int, train_loss: float, train_acc: float, img_s: float) -> dict[str, Any]:
        # The epoch's mean learning rate: the step size its updates really had (the rate at the
        # epoch's last step would read 0 at the end of a cosine schedule).
        first = epoch * self.steps_per_epoch
        factors = [self.scheduler.lr_lambdas[0](s) for s in range(first, first + self.steps_per_epoch)]
        lr = self.cfg.lr * sum(factors) / len(factors)
        test_acc, test_images = self.evaluate(last=epoch + 1 == self.cfg.epochs)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
               "test_acc": test_acc, "test_images": test_images, "train_images_per_s": img_s,
               "decay_time": decay_time(self.scheduler.lr_lambdas[0], self.cfg.lr, self.cfg.weight_decay,
                                        first + self.steps_per_epoch)}
        row.update(mechanisms.gamma_stats(self.role_tensors, lr))
        batch = self.augment.normalize(self.variance_x)
        row["variance_ratio"] = mechanisms.variance_ratios(self.model, batch)
        return row

    # -- the whole run --------------------------------------------------------------------------------
    def run(self) -> RunRecord:
        cfg = self.cfg
        wall = time.perf_counter()
        status, reason = "ok", None
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                loss, acc, img_s = self.train_epoch(epoch)
                if self.ctx.is_main:
                    row = self.measure(epoch, loss, acc, img_s)
                    self.history.append(row)
                    self.log(f"[{cfg.policy} seed {cfg.seed}] epoch {epoch + 1}/{cfg.epochs}  loss {loss:.4f}  "
                             f"train {acc:.4f}  test {row['test_acc']:.4f}  {img_s:.0f} img/s")
                    self._save(epoch + 1)
                barrier(self.ctx)  # the other ranks wait while rank 0 evaluates and saves
        except FloatingPointError as exc:
            status, reason = "failed", str(exc)
            self.log(f"[{cfg.policy} seed {cfg.seed}] stopped: {exc}")
        counts = self.report.counts()
        decayed = {r: 0 for r in counts}
        for e in self.report.entries:
            decayed[e.role] += e.decay
        return RunRecord(
            key=cfg.key(), arm=cfg.policy, seed=cfg.seed, status=status, reason=reason,
            test_acc=self.history[-1]["test_acc"] if status == "ok" and self.history else None,
            model=cfg.model, data=cfg.data, epochs=cfg.epochs, settings=cfg.settings(), history=self.history,
            roles={r: {"count": counts[r], "decayed": decayed[r]} for r in counts if counts[r]},
            train_images_per_s=self.train_images / self.train_seconds if self.train_seconds else None,
            wall_s=time.perf_counter() - wall,
            environment=environment(self.device, self.ctx.world_size, self.numerics),
        )

"""The training loop: one for every task (``task.py``), for a lone run and for a fused group.

``Trainer(config, data, ctx)`` trains one run; ``Trainer([configs], data, ctx)`` trains runs that
differ only in policy and seed as one fused network (``network.Fused``), each with its own
semantics. The loop is the same: seeding (in the network), the schedule, the optimizer over the
policy's groups, checkpoint and resume, evaluation, the mechanisms and one results record per run.

Per run it keeps a history, a failure, its training seconds and examples. A non-finite loss stops
that run alone: it is found every 20 steps (one host sync; enough to stop a diverged run early
without stalling the device on every step), recorded ``failed`` with the step, and its part of a
fused network is zeroed; the others go on. Every epoch ends with one checkpoint (a lone run's
``<key>.pt``, a group's ``group-<key>.pt``); a killed run resumes from it exactly.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import GammaGuideError
from . import numerics as numerics_module
from .checkpoints import (discard_checkpoint, load_checkpoint, restore_training_state, save_checkpoint,
                          training_state)
from .config import decay_time
from .distributed import DistContext, all_sum, barrier
from .network import Fused, Single, group_key, shared_settings
from .progress import bar as progress_bar
from .results import RunRecord, append_line
from .tasks import for_config

CHECK_EVERY = 20  # steps between host syncs


class Trainer:
    """The state of one run, or of one fused group; ``run()`` trains it to the end (resuming from
    its checkpoint) and returns its record (a group: one per run, in order).

    A trainer shows its task's data as its own attributes (``trainer.train_x``...)."""

    def __init__(self, configs: Any, data: Any, ctx: DistContext, *, checkpoint: str | os.PathLike | None = None,
                 progress: bool = True, compile: bool = False, log: Callable[[str], None] | None = None):
        self.lone = not isinstance(configs, (list, tuple))
        configs = [configs] if self.lone else list(configs)
        if not configs:
            raise GammaGuideError("a fused group needs at least one run")
        for c in configs:
            c.check()
            if shared_settings(c) != shared_settings(configs[0]):
                raise GammaGuideError(f"runs {configs[0].policy} seed {configs[0].seed} and {c.policy} seed {c.seed} "
                                      f"differ in more than policy and seed; only such runs fuse")
        if len({c.key() for c in configs}) != len(configs):
            raise GammaGuideError("a fused group lists one run twice")
        cfg = self.cfg = configs[0]
        self.configs, self.n, self.ctx, self.device = configs, len(configs), ctx, ctx.device
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.progress = progress and ctx.is_main
        self.log = log if ctx.is_main and log is not None else (lambda msg: None)
        self.numerics = numerics_module.resolve(cfg, self.device)
        self.numerics.apply(self.device)
        task_class = for_config(cfg)
        if not self.lone and not task_class.fusable:
            raise GammaGuideError("--fuse and --compile fuse image grids (BatchNorm ResNets); text grids train each "
                                  "run alone: leave them out, and use --jobs N for runs at once")
        self.task = task_class(configs, data, ctx, self.numerics, fused=not self.lone)
        if self.task.n_train < cfg.batch_size:
            raise GammaGuideError(f"the training set has {self.task.n_train} {self.task.noun}, fewer than one batch "
                                  f"of {cfg.batch_size}; use a larger --subset or a smaller --batch-size")
        self.network = Single(self.task, cfg, ctx) if self.lone else Fused(self.task, configs, ctx, compile)
        self.steps_per_epoch = self.task.n_train // cfg.batch_size  # whole batches only
        total = self.steps_per_epoch * cfg.epochs
        warmup = int(cfg.warmup_epochs * self.steps_per_epoch)
        factor = self.task.lr_factor
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.network.optimizer, lambda s: factor(s, total, cfg.schedule, warmup))
        self.compiled, self.compile_s = compile, None  # the first step's seconds, compilation included
        self.histories: list[list[dict[str, Any]]] = [[] for _ in configs]
        self.failed: list[str | None] = [None] * self.n
        self.train_seconds = [0.0] * self.n
        self.train_items = [0] * self.n
        self.start_epoch = 0
        self._resume()

    def __getattr__(self, name: str) -> Any:  # the task's data: train_x, augment, variance_x...
        if name == "task":
            raise AttributeError(name)
        return getattr(self.task, name)

    # the network's parts, under the names the loop's callers use
    model = property(lambda self: self.network.model)
    optimizer = property(lambda self: self.network.optimizer)
    params = property(lambda self: self.network.params)
    history = property(lambda self: self.histories[0])  # a lone run's

    def unfused_state(self, m: int) -> dict[str, torch.Tensor]:
        """Run m's state dict (a fused group's: views into the fused one)."""
        return self.network.unfused_state(m) if not self.lone else self.network.model.state_dict()

    @property
    def net(self) -> torch.nn.Module:
        return self.network.net

    @net.setter
    def net(self, module: torch.nn.Module) -> None:  # e.g. torch.compile(trainer.model)
        self.network.net = module

    @property
    def live(self) -> list[int]:
        return [m for m in range(self.n) if self.failed[m] is None]

    # -- checkpoints: a killed run resumes at its last finished epoch ----------------------------
    def _owner(self) -> tuple[str, str]:
        return ("key", self.cfg.key()) if self.lone else ("group", group_key(self.configs))

    def _resume(self) -> None:
        state = load_checkpoint(self.checkpoint, self.device, self._owner(), self.log)
        if state is None:
            return
        restore_training_state(state, self.network.model, self.network.optimizer, self.scheduler)
        self.start_epoch = state["epoch"]
        items = f"train_{self.task.unit}"
        if self.lone:
            self.histories, self.train_seconds, self.train_items = ([state["history"]], [state["train_seconds"]],
                                                                   [state[items]])
            self.task.restore(state)
            self.log(f"resuming {self.cfg.policy} seed {self.cfg.seed} after epoch {self.start_epoch}")
        else:
            self.histories, self.failed = state["histories"], state["failed"]
            self.train_seconds, self.train_items = state["train_seconds"], state[items]
            self.log(f"resuming a fused group of {self.n} runs after epoch {self.start_epoch}")

    def _save(self, epoch: int) -> None:
        if self.checkpoint is None or not self.ctx.is_main:
            return
        field, owner = self._owner()
        state = {field: owner, "epoch": epoch,
                 **training_state(self.network.model, self.network.optimizer, self.scheduler)}
        items = f"train_{self.task.unit}"
        if self.lone:
            state.update(history=self.histories[0], train_seconds=self.train_seconds[0],
                         **{items: self.train_items[0]}, **self.task.state())
        else:
            state.update(members=[c.key() for c in self.configs], histories=self.histories, failed=self.failed,
                         train_seconds=self.train_seconds, **{items: self.train_items}, **self.network.state())
        save_checkpoint(self.checkpoint, state)

    def save_result(self, record: RunRecord, results: str | os.PathLike) -> None:
        """Rank 0 appends the finished run to the results file, then drops its checkpoint."""
        if self.ctx.is_main:
            append_line(results, record.to_json())
            self.discard_checkpoint()

    def discard_checkpoint(self) -> None:
        if self.checkpoint is not None and self.ctx.is_main:
            discard_checkpoint(self.checkpoint)

    # -- one step, one epoch --------------------------------------------------------------------------
    def epoch_batches(self, epoch: int):
        """The epoch's ``(inputs, target)`` pairs (a fused group's: run m's batch at m)."""
        for inputs, target, _, _ in self.task.batches(epoch):
            yield inputs, target

    def forward_backward(self, inputs: Any, target: torch.Tensor,
                         alive: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """Each run's loss ``[n]`` and the output; leaves each run's own gradients."""
        return self.network.forward_backward(inputs, target, alive)

    def optimizer_step(self) -> None:
        """The optimizer's step (each run's weight decay per parameter), then the schedule's."""
        self.network.optimizer_step()
        self.scheduler.step()

    def _stop(self, m: int, reason: str) -> None:
        self.failed[m] = reason
        self.network.stop(m)
        c = self.configs[m]
        self.log(f"[{c.policy} seed {c.seed}] stopped: {reason}")

    def train_epoch(self, epoch: int) -> tuple[Any, Any, float]:
        """(mean loss, accuracy, throughput) of one epoch; a group's losses and accuracies are lists,
        one per run. A run whose loss turns non-finite is stopped (``self.failed``)."""
        cfg, n = self.cfg, self.n
        alive = torch.tensor([f is None for f in self.failed], device=self.device)
        self.network.net.train()
        sums = torch.zeros(2, n, device=self.device, dtype=torch.float64)  # loss * examples, correct
        count = real = shown = 0
        fused = "" if self.lone else f" ({n} fused)"
        bar = progress_bar(self.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}{fused}", "step",
                           self.progress and sys.stderr.isatty())
        start = time.perf_counter()
        for step, (inputs, target, counted, tokens) in zip(range(self.steps_per_epoch),
                                                           self.task.batches(epoch), strict=False):
            timing, t0 = self.compiled and self.compile_s is None, time.perf_counter()
            losses, out = self.forward_backward(inputs, target, alive)
            self.optimizer_step()
            if timing:  # torch.compile compiles in the first step
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.compile_s = time.perf_counter() - t0
                self.log(f"torch.compile: the first training step took {self.compile_s:.1f} s")
            with torch.no_grad():
                sums += torch.stack([losses.detach().double() * counted,
                                     self.task.correct(out, target).double().reshape(-1)])
            count += counted
            real += tokens
            if (step + 1) % CHECK_EVERY == 0 or step + 1 == self.steps_per_epoch:
                loss_sums, right = sums.tolist()  # one host sync every few steps
                for m in self.live:
                    if not math.isfinite(loss_sums[m]):
                        self._stop(m, f"non-finite training loss ({loss_sums[m]}) at epoch {epoch + 1}, "
                                      f"step {step + 1}")
                        alive[m] = False
                live = self.live
                if not live:
                    break
                bar.update(step + 1 - shown)
                shown = step + 1
                bar.set_postfix(loss=f"{sum(loss_sums[m] for m in live) / len(live) / count:.3f}",
                                acc=f"{sum(right[m] for m in live) / len(live) / count:.3f}",
                                rate=f"{real * self.ctx.world_size / (time.perf_counter() - start):.0f}",
                                refresh=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        bar.close()
        if self.ctx.distributed:  # every rank's counts (a lone image run under torchrun)
            totals = torch.cat([sums.view(-1), torch.tensor([float(count), float(real)], device=self.device,
                                                                 dtype=torch.float64)])
            *flat, count, real = all_sum(self.ctx, totals).tolist()
            sums = torch.tensor(flat, dtype=torch.float64).view(2, n)
            if self.failed[0] is None and not math.isfinite(flat[0]):
                self._stop(0, f"non-finite training loss ({flat[0]}) at epoch {epoch + 1}")
        loss_sums, right = sums.tolist()
        for m in self.live:
            self.train_seconds[m] += seconds
            self.train_items[m] += int(real)
        losses = [s / count for s in loss_sums]
        accs = [c / count for c in right]
        rate = real / seconds
        return (losses[0], accs[0], rate) if self.lone else (losses, accs, rate)

    # -- measurements ---------------------------------------------------------------------------------
    def measure(self, epoch: int, losses: Any, accs: Any, rate: float) -> Any:
        """The epoch's history row of each run still going (None for a stopped one); a lone run's row."""
        if self.lone:
            losses, accs = [losses], [accs]
        first = epoch * self.steps_per_epoch
        # The epoch's mean learning rate: the step size its updates really had (the rate at the
        # epoch's last step would read 0 at the end of a cosine schedule).
        factors = [self.scheduler.lr_lambdas[0](s) for s in range(first, first + self.steps_per_epoch)]
        lr = self.cfg.lr * sum(factors) / len(factors)
        metrics = self.task.evaluate(self.network, last=epoch + 1 == self.cfg.epochs)
        mechanisms = self.network.mechanisms(lr, self.task.probe(), self.failed)
        timing = {f"train_{self.task.unit}_per_s": rate,
                  "decay_time": decay_time(self.scheduler.lr_lambdas[0], self.cfg.lr, self.cfg.weight_decay,
                                           first + self.steps_per_epoch)}
        rows: list[dict[str, Any] | None] = []
        for m in range(self.n):
            if self.failed[m] is not None:
                rows.append(None)
                continue
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": losses[m], "train_acc": accs[m]}
            # key order as the records have always had it
            row.update({**metrics[m], **timing} if self.task.metrics_first else {**timing, **metrics[m]})
            row.update(mechanisms[m])
            rows.append(row)
        return rows[0] if self.lone else rows

    # -- the whole run --------------------------------------------------------------------------------
    def run(self) -> Any:
        wall = time.perf_counter()
        metric, unit = self.task.metric, self.task.unit
        for epoch in range(self.start_epoch, self.cfg.epochs):
            if not self.live:
                break
            losses, accs, rate = self.train_epoch(epoch)
            if self.live and self.ctx.is_main:
                rows = self.measure(epoch, losses, accs, rate)
                for m, row in enumerate([rows] if self.lone else rows):
                    if row is None:
                        continue
                    self.histories[m].append(row)
                    c, value = self.configs[m], row.get(metric)
                    shown = "-" if value is None else f"{value:.4f}" if metric == "test_acc" else f"{value:.2f}"
                    self.log(f"[{c.policy} seed {c.seed}] epoch {epoch + 1}/{c.epochs}  loss {row['train_loss']:.4f}"
                             f"  train {row['train_acc']:.4f}  {metric} {shown}  {rate:.0f} {unit}/s"
                             + ("" if self.lone else f" (x{self.n} fused)"))
                self._save(epoch + 1)
            barrier(self.ctx)  # the other ranks wait while rank 0 evaluates and saves
        for note in self.task.notes():
            self.log(f"[{self.cfg.policy} seed {self.cfg.seed}] {note}")
        wall = time.perf_counter() - wall
        records = [self._record(m, wall) for m in range(self.n)]
        return records[0] if self.lone else records

    def _record(self, m: int, wall: float) -> RunRecord:
        cfg, report, history = self.configs[m], self.network.reports[m], self.histories[m]
        ok = self.failed[m] is None
        counts = report.counts()
        decayed = {r: 0 for r in counts}
        for e in report.entries:
            decayed[e.role] += e.decay
        env = environment(self.device, self.ctx.world_size, self.numerics)
        if not self.lone:
            env["fused_runs"] = self.n
        seconds, items = self.train_seconds[m], self.train_items[m]
        final = history[-1].get(self.task.metric) if ok and history else None
        return self.task.record(
            key=cfg.key(), arm=cfg.policy, seed=cfg.seed, status="ok" if ok else "failed", reason=self.failed[m],
            model=cfg.model, data=cfg.data, epochs=cfg.epochs, settings=cfg.settings(), history=history,
            roles={r: {"count": counts[r], "decayed": decayed[r]} for r in counts if counts[r]},
            wall_s=wall, environment=env, **{f"train_{self.task.unit}_per_s": items / seconds if seconds else None},
            **self.task.record_fields(ok, final))


def failed_record(cfg: Any, reason: str) -> RunRecord:
    """The record of a run that broke before it could train (its task's record type)."""
    task = for_config(cfg)
    fields = {"metric": task.metric} if task.record is not RunRecord else {}
    return task.record(key=cfg.key(), arm=cfg.policy, seed=cfg.seed, status="failed", reason=reason, test_acc=None,
                       model=cfg.model, data=cfg.data, epochs=cfg.epochs, settings=cfg.settings(), **fields)


def environment(device: torch.device, world: int, used: numerics_module.Numerics | None = None) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "world_size": world, "threads": torch.get_num_threads(), "host": platform.node()}
    if used is not None:
        env.update(used.record())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def score(record: RunRecord) -> str:
    """A finished run's score for a log line (``test accuracy 0.8125``, ``test_bleu 21.40``)."""
    metric = getattr(record, "metric", None)
    value = getattr(record, metric or "test_acc")
    name = metric or "test accuracy"
    return f"{name} {'-' if value is None else f'{value:.4f}'}"

"""A group of runs trained as one fused network (``fused.py``), with each run's own semantics.

Runs of a group share every setting but their policy and seed. Each keeps, exactly as when it
trains alone (``train.Trainer``):

- its initial weights (its model is built right after ``torch.manual_seed(seed)``, then fused);
- its batches, crops and flips (``data.epoch_plan`` of its seed; runs of one seed share them);
- its BatchNorm statistics (one fused BatchNorm keeps a channel block per run);
- its weight decay per parameter, from ``param_groups`` of its own unfused model and policy;
- SGD (momentum, Nesterov), the schedule, the evaluation, and its record: every epoch's
  history with both mechanisms measured on the run's own model, unfused from the group.

A non-finite loss stops that run only: it is found at the same steps as a lone run finds it
(every 20 steps), recorded ``failed`` with the same reason, and its channel block is zeroed so
that nothing of it can reach the others; the rest of the group goes on. The group checkpoints
every epoch (``group-<key>.pt``); a killed group resumes from it, and a checkpoint unfuses into
per-run state dicts (``unfuse_checkpoint``).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from .. import analysis, groups
from ..errors import GammaGuideError
from ..models import create_model
from . import fused as FU
from . import mechanisms, numerics
from .checkpoints import (discard_checkpoint, load_checkpoint, restore_training_state, save_checkpoint,
                          training_state)
from .data import Augment, Dataset, epoch_plan
from .distributed import DistContext
from .progress import bar as progress_bar
from .results import run_key
from .train import RunRecord, TrainConfig, _probe_indices, decay_time, environment, lr_factor

CHECK_EVERY = 20  # steps between host syncs, as in train.Trainer.train_epoch
_CHECKED: set[str] = set()  # models whose fusability was checked in this process


def shared_settings(cfg: TrainConfig) -> dict[str, Any]:
    """What the runs of one group must have in common: everything but policy and seed."""
    s = asdict(cfg)
    s.pop("policy")
    s.pop("seed")
    return s


def group_key(configs: list[TrainConfig]) -> str:
    """The id of a group: its runs, in order (its checkpoint is ``group-<key>.pt``)."""
    return run_key({"fused_group": [c.key() for c in configs]})


def checkpoint_members(path: str | os.PathLike) -> list[str] | None:
    """The run keys a group checkpoint holds, without reading its tensors; None if unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return list(state["members"])
    except Exception:
        return None


def check_model_fuses(name: str, num_classes: int) -> None:
    """Once per process and model: raise ``GammaGuideError`` naming what keeps it from fusing."""
    if name in _CHECKED:
        return
    torch.manual_seed(0)
    FU.check_fusable(create_model(name, num_classes=num_classes), torch.randn(2, 3, 32, 32))
    _CHECKED.add(name)


class FusedTrainer:
    """The state of one group; ``run()`` trains it to the end and returns one record per run."""

    def __init__(self, configs: list[TrainConfig], data: Dataset, ctx: DistContext, *,
                 checkpoint: str | os.PathLike | None = None, progress: bool = True, compile: bool = False,
                 log: Callable[[str], None] | None = None):
        if not configs:
            raise GammaGuideError("a fused group needs at least one run")
        if ctx.distributed:
            raise GammaGuideError("--fuse trains a group in one process; under torchrun use --fuse 1")
        for c in configs:
            c.check()
            if shared_settings(c) != shared_settings(configs[0]):
                raise GammaGuideError(f"runs {configs[0].policy} seed {configs[0].seed} and {c.policy} seed {c.seed} "
                                      f"differ in more than policy and seed; only such runs fuse")
        if len({c.key() for c in configs}) != len(configs):
            raise GammaGuideError("a fused group lists one run twice")
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.group_key = group_key(configs)
        self.log = log or (lambda msg: None)
        self.configs = configs
        self.n = n = len(configs)
        cfg = self.cfg = configs[0]
        self.ctx, self.device = ctx, ctx.device
        self.cuda = self.device.type == "cuda"
        self.numerics = numerics.resolve(cfg, self.device)
        self.numerics.apply(self.device)
        self.progress = progress

        data = data.subset(cfg.subset, cfg.test_subset, cfg.subset_seed)
        if len(data.train_y) < cfg.batch_size:
            raise GammaGuideError(f"the training set has {len(data.train_y)} images, fewer than one batch of "
                                  f"{cfg.batch_size}; use a larger --subset or a smaller --batch-size")
        self.train_x, self.train_y = data.train_x.to(self.device), data.train_y.to(self.device)
        self.test_x, self.test_y = data.test_x.to(self.device), data.test_y.to(self.device)
        self.epoch_test = None
        if cfg.epoch_test_subset and cfg.epoch_test_subset < len(data.test_y):
            part = data.subset(None, cfg.epoch_test_subset, cfg.subset_seed)
            self.epoch_test = (part.test_x.to(self.device), part.test_y.to(self.device))
        self.augment = Augment(self.device)  # channels_last is applied to the fused batch
        probe = _probe_indices(data.test_y, cfg.variance_batch, cfg.subset_seed).to(self.device)
        self.variance_x = self.test_x[probe]
        self.seeds = sorted({c.seed for c in configs})
        self.seed_of_run = torch.tensor([self.seeds.index(c.seed) for c in configs], device=self.device)

        check_model_fuses(cfg.model, data.num_classes)
        models = []
        for c in configs:
            torch.manual_seed(c.seed)  # each run's initial weights, as when it trains alone
            models.append(create_model(c.model, num_classes=data.num_classes))
        example = self.augment.normalize(self.test_x[:2]).cpu()
        self.reports, decays = [], []
        for c, model in zip(configs, models, strict=True):
            report = analysis.analyze(model, example, c.policy, warn=False)
            names = {id(p): name for name, p in model.named_parameters()}
            decay = {names[id(p)]: g["weight_decay"] for g in groups.param_groups(model, c.weight_decay,
                                                                                 report=report) for p in g["params"]}
            self.reports.append(report)
            decays.append(decay)
        fused = FU.fuse_structure(models[0], n)
        FU.fuse_states(fused, [m.state_dict() for m in models])
        fused = fused.to(self.device)
        # The per-run model the mechanisms are measured on, set up as a lone run sets up its own.
        self.run_model = models[0].to(self.device)
        if self.numerics.channels_last:
            fused = fused.to(memory_format=torch.channels_last)
            self.run_model = self.run_model.to(memory_format=torch.channels_last)
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        self.model = fused
        self.params = list(fused.parameters())
        self.decays = FU.decay_tensors(fused, decays, models[0])
        self.optimizer = torch.optim.SGD(self.params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                         weight_decay=0.0, foreach=True)
        self.steps_per_epoch = len(self.train_y) // cfg.batch_size
        total = self.steps_per_epoch * cfg.epochs
        warmup = int(cfg.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, cfg.schedule, warmup))
        self.net = fused
        self.compile_s: float | None = None
        if compile:
            self.net = torch.compile(fused)
        self.role_tensors = [mechanisms.role_tensors(self.run_model, r, torch.optim.SGD(
            groups.param_groups(self.run_model, c.weight_decay, report=r, lr=c.lr), lr=c.lr))
            for c, r in zip(configs, self.reports, strict=True)]
        self.histories: list[list[dict[str, Any]]] = [[] for _ in configs]
        self.failed: list[str | None] = [None] * n
        self.train_seconds = [0.0] * n
        self.train_images = [0] * n
        self.start_epoch = 0
        self._resume()

    # -- checkpoints ------------------------------------------------------------------------------
    def _resume(self) -> None:
        state = load_checkpoint(self.checkpoint, self.device, ("group", self.group_key), self.log)
        if state is None:
            return
        restore_training_state(state, self.model, self.optimizer, self.scheduler)
        self.histories, self.failed = state["histories"], state["failed"]
        self.train_seconds, self.train_images = state["train_seconds"], state["train_images"]
        self.start_epoch = state["epoch"]
        self.log(f"resuming a fused group of {self.n} runs after epoch {self.start_epoch}")

    def _save(self, epoch: int) -> None:
        if self.checkpoint is None:
            return
        save_checkpoint(self.checkpoint, {
            "group": self.group_key, "members": [c.key() for c in self.configs], "epoch": epoch,
            **training_state(self.model, self.optimizer, self.scheduler), "histories": self.histories,
            "failed": self.failed,
            "train_seconds": self.train_seconds, "train_images": self.train_images,
            "run_state": self.run_model.state_dict(),
            "param_names": [k for k, _ in self.model.named_parameters()]})

    def discard_checkpoint(self) -> None:
        if self.checkpoint is not None:
            discard_checkpoint(self.checkpoint)

    # -- one epoch ----------------------------------------------------------------------------------
    def _fused_batch(self, x: torch.Tensor) -> torch.Tensor:
        x = FU.fuse_inputs(x)
        return x.contiguous(memory_format=torch.channels_last) if self.numerics.channels_last else x

    def _kill(self, m: int, reason: str) -> None:
        """Run m stops: record why, and zero its block (parameters, momentum, BatchNorm
        statistics) so that its non-finite values cannot reach any other run."""
        self.failed[m] = reason
        self.log(f"[{self.configs[m].policy} seed {self.configs[m].seed}] stopped: {reason}")
        run_state = self.run_model.state_dict()
        fused_state = self.model.state_dict()
        momentum = {id(p): self.optimizer.state.get(p, {}).get("momentum_buffer") for p in self.params}
        names = {id(p): k for k, p in self.model.named_parameters()}
        with torch.no_grad():
            for key, like in run_state.items():
                if like.dim() == 0:
                    continue
                FU.unfuse_tensor(fused_state[key], self.n, m, like).fill_(1.0 if key.endswith("running_var") else 0.0)
            for p in self.params:
                buf = momentum[id(p)]
                if buf is not None:
                    FU.unfuse_tensor(buf, self.n, m, run_state[names[id(p)]]).zero_()

    def epoch_batches(self, epoch: int):
        """The epoch's batches: ``(x [N, B, C, H, W], y [N, B])`` per step, run m's batch at m.

        Each seed's batch is augmented once (``data.epoch_plan`` of that seed, as a lone run
        draws it) and shared by the runs of that seed."""
        b = self.cfg.batch_size
        plans = [epoch_plan(len(self.train_y), s, epoch) for s in self.seeds]
        order = torch.stack([p.order for p in plans]).to(self.device)
        dys = torch.stack([p.dy for p in plans]).to(self.device)
        dxs = torch.stack([p.dx for p in plans]).to(self.device)
        flips = torch.stack([p.flip for p in plans]).to(self.device)
        seed_rows = torch.arange(len(self.seeds), device=self.device).view(-1, 1)
        for step in range(self.steps_per_epoch):
            idx = order[:, step * b:(step + 1) * b]  # [S, B]: each seed's batch
            rows = seed_rows.expand_as(idx)
            x = self.augment(self.train_x[idx.reshape(-1)], dys[rows, idx].reshape(-1), dxs[rows, idx].reshape(-1),
                             flips[rows, idx].reshape(-1))
            x = x.view(len(self.seeds), b, *x.shape[1:])[self.seed_of_run]
            yield x, self.train_y[idx][self.seed_of_run]

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor,
                         alive: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each run's loss ``[N]`` and logits ``[B, N, K]``; leaves each run's own gradients.

        The backward pass starts from the sum of the live runs' mean losses: the gradient of
        run m's parameters is that of run m's loss alone."""
        with self.numerics.autocast(self.device):
            out = self.net(self._fused_batch(x))
            losses = FU.run_losses(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        live = losses if alive is None else torch.where(alive, losses, torch.zeros_like(losses))
        live.sum().backward()
        return losses, out

    def optimizer_step(self) -> None:
        """SGD with each run's weight decay per parameter, then the schedule's step."""
        FU.add_weight_decay(self.params, self.decays)
        self.optimizer.step()
        self.scheduler.step()

    def train_epoch(self, epoch: int) -> tuple[list[float], list[float], float]:
        """Per run (mean loss, accuracy) of one epoch, and the seconds it took; runs whose loss
        turns non-finite are stopped (``self.failed``)."""
        cfg, n, b = self.cfg, self.n, self.cfg.batch_size
        alive = torch.tensor([f is None for f in self.failed], device=self.device)
        self.net.train()
        sums = torch.zeros(2, n, device=self.device, dtype=torch.float64)  # loss * images, correct
        count = shown = 0
        bar = progress_bar(self.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs} ({n} fused)", "step",
                           self.progress and sys.stderr.isatty())
        start = time.perf_counter()
        for step, (x, y) in enumerate(self.epoch_batches(epoch)):
            timing = self.compile_s is None and self.net is not self.model
            t0 = time.perf_counter()
            losses, out = self.forward_backward(x, y, alive)
            self.optimizer_step()
            if timing:
                if self.cuda:
                    torch.cuda.synchronize(self.device)
                self.compile_s = time.perf_counter() - t0
                self.log(f"torch.compile: the first training step took {self.compile_s:.1f} s")
            with torch.no_grad():
                sums += torch.stack([losses.detach().double() * b, (out.argmax(-1) == y.t()).sum(0).double()])
            count += b
            if (step + 1) % CHECK_EVERY == 0 or step + 1 == self.steps_per_epoch:
                # One host sync every few steps, as a lone run does: the same steps find a
                # non-finite loss, and the device is not stalled on every step.
                loss_sums, _ = sums.tolist()
                for m in range(n):
                    if self.failed[m] is None and not math.isfinite(loss_sums[m]):
                        self._kill(m, f"non-finite training loss ({loss_sums[m]}) at epoch {epoch + 1}, "
                                      f"step {step + 1}")
                        alive[m] = False
                live = [m for m in range(n) if self.failed[m] is None]
                if not live:
                    break
                bar.update(step + 1 - shown)
                shown = step + 1
                bar.set_postfix(loss=f"{sum(loss_sums[m] for m in live) / len(live) / count:.3f}",
                                img_s=f"{count * n / (time.perf_counter() - start):.0f}", refresh=False)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        bar.close()
        loss_sums, corrects = sums.tolist()
        return [s / count for s in loss_sums], [c / count for c in corrects], seconds

    @torch.no_grad()
    def evaluate(self, last: bool = True) -> tuple[list[float], int]:
        """Each run's accuracy on the whole test set, or the per-epoch part of it."""
        xs, ys = (self.test_x, self.test_y) if last or self.epoch_test is None else self.epoch_test
        self.model.eval()
        correct = torch.zeros(self.n, device=self.device, dtype=torch.long)
        chunk = 1000 if self.n <= 8 else max(100, 8000 // self.n)  # eval-mode BN: chunking changes nothing
        for i in range(0, len(ys), chunk):
            x = self.augment.normalize(xs[i:i + chunk])
            x = self._fused_batch(x.unsqueeze(0).expand(self.n, *x.shape))
            with self.numerics.autocast(self.device):
                correct += (self.model(x).argmax(-1) == ys[i:i + chunk, None]).sum(0)
        return [int(c) / len(ys) for c in correct.tolist()], len(ys)

    def unfused_state(self, m: int) -> dict[str, torch.Tensor]:
        """Run m's state dict (views into the fused one)."""
        return FU.unfuse_state(self.model.state_dict(), self.n, m, self.run_model.state_dict())

    def measure(self, epoch: int, losses: list[float], accs: list[float], img_s: float) -> None:
        """Append this epoch's row to the history of every run still going."""
        first = epoch * self.steps_per_epoch
        factors = [self.scheduler.lr_lambdas[0](s) for s in range(first, first + self.steps_per_epoch)]
        lr = self.cfg.lr * sum(factors) / len(factors)
        test_accs, test_images = self.evaluate(last=epoch + 1 == self.cfg.epochs)
        x = self.augment.normalize(self.variance_x)
        ratios = FU.variance_ratios(self.model, self._fused_batch(x.unsqueeze(0).expand(self.n, *x.shape)), self.n)
        for m in range(self.n):
            if self.failed[m] is not None:
                continue
            self.run_model.load_state_dict(self.unfused_state(m))  # the γ and weights of run m alone
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": losses[m], "train_acc": accs[m],
                   "test_acc": test_accs[m], "test_images": test_images, "train_images_per_s": img_s,
                   "decay_time": decay_time(self.scheduler.lr_lambdas[0], self.cfg.lr, self.cfg.weight_decay,
                                            first + self.steps_per_epoch)}
            row.update(mechanisms.gamma_stats(self.role_tensors[m], lr))
            row["variance_ratio"] = ratios[m]
            self.histories[m].append(row)
            c = self.configs[m]
            self.log(f"[{c.policy} seed {c.seed}] epoch {epoch + 1}/{c.epochs}  loss {losses[m]:.4f}  "
                     f"train {accs[m]:.4f}  test {test_accs[m]:.4f}  {img_s:.0f} img/s (x{self.n} fused)")

    # -- the whole group --------------------------------------------------------------------------
    def run(self) -> list[RunRecord]:
        wall = time.perf_counter()
        for epoch in range(self.start_epoch, self.cfg.epochs):
            if all(f is not None for f in self.failed):
                break
            losses, accs, seconds = self.train_epoch(epoch)
            images = self.steps_per_epoch * self.cfg.batch_size
            for m in range(self.n):
                if self.failed[m] is None:  # a run that failed this epoch keeps its earlier totals
                    self.train_seconds[m] += seconds
                    self.train_images[m] += images
            if any(f is None for f in self.failed):
                self.measure(epoch, losses, accs, images / seconds)
            self._save(epoch + 1)
        wall = time.perf_counter() - wall
        return [self._record(m, wall) for m in range(self.n)]

    def _record(self, m: int, wall: float) -> RunRecord:
        cfg, report = self.configs[m], self.reports[m]
        ok = self.failed[m] is None
        counts = report.counts()
        decayed = {r: 0 for r in counts}
        for e in report.entries:
            decayed[e.role] += e.decay
        env = environment(self.device, 1, self.numerics)
        env["fused_runs"] = self.n
        history = self.histories[m]
        return RunRecord(
            key=cfg.key(), arm=cfg.policy, seed=cfg.seed, status="ok" if ok else "failed", reason=self.failed[m],
            test_acc=history[-1]["test_acc"] if ok and history else None, model=cfg.model, data=cfg.data,
            epochs=cfg.epochs, settings=cfg.settings(), history=history,
            roles={r: {"count": counts[r], "decayed": decayed[r]} for r in counts if counts[r]},
            train_images_per_s=self.train_images[m] / self.train_seconds[m] if self.train_seconds[m] else None,
            wall_s=wall, environment=env)


def unfuse_checkpoint(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Run key -> {"model": its state dict, "momentum": {parameter name: buffer}} from a group
    checkpoint: what each run would have saved alone."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    run_state, n = state["run_state"], len(state["members"])
    out = {}
    for m, key in enumerate(state["members"]):
        model = FU.unfuse_state(state["model"], n, m, run_state)
        momentum = {}
        for i, name in enumerate(state["param_names"]):  # the optimizer numbers them in this order
            buf = state["optimizer"]["state"].get(i, {}).get("momentum_buffer")
            if buf is not None:
                momentum[name] = FU.unfuse_tensor(buf, n, m, run_state[name]).clone()
        out[key] = {"model": {k: v.clone() for k, v in model.items()}, "momentum": momentum}
    return out

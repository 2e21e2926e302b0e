"""The network a trainer steps: one run's model (``Single``) or a group of runs fused into one
network (``Fused``, see ``fused.py`` and docs/fused.md). Both answer the same calls, so the loop
(``trainer.py``) does not know which it has:

- ``forward_backward(inputs, target, alive)``: each run's loss ``[n]`` and the output, with each
  run's own gradients left on the parameters;
- ``optimizer_step()``: the optimizer's step with each run's weight decay per parameter;
- ``logits(x)``: each run's logits ``[B, n, K]`` of an input batch, for evaluation;
- ``mechanisms(lr, probe, failed)``: each run's |γ|, effective learning rates and variance ratios;
- ``stop(m)``: run m has failed; nothing of it may reach the others.

A run keeps its semantics either way: its initial weights (its model is built right after
``torch.manual_seed(seed)``), its policy's weight decay per parameter (``param_groups`` of its own
unfused model), its loss and its measurements. A lone run uses the stock optimizer over its
parameter groups; a fused group adds each run's decay to the gradient before a stock step with
``weight_decay=0`` (what SGD with per-group weight decay computes).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from .. import analysis, groups
from ..errors import GammaGuideError
from . import fused as FU
from . import mechanisms
from .distributed import DistContext
from .results import run_key


class Single:
    """One run: its model, the optimizer over its policy's parameter groups (DDP under torchrun)."""

    n = 1

    def __init__(self, task: Any, cfg: Any, ctx: DistContext, compile: bool = False):
        self.task, self.device = task, ctx.device
        torch.manual_seed(cfg.seed)  # the initial weights: the same for every arm of a seed
        self.model = model = task.place(task.new_model(cfg))
        self.report = analysis.analyze(model, task.example, cfg.policy, warn=False)
        self.reports = [self.report]
        self.groups = groups.param_groups(model, cfg.weight_decay, report=self.report, lr=cfg.lr)
        self.optimizer = task.optimizer(self.groups, cfg, cfg.weight_decay)
        self.net = model
        if ctx.distributed:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if compile:
            self.net = torch.compile(model)
        self.role_tensors = mechanisms.role_tensors(model, self.report, self.optimizer)

    def forward_backward(self, inputs: Any, target: torch.Tensor,
                         alive: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        with self.task.numerics.autocast(self.device):
            out = self.net(*inputs) if isinstance(inputs, tuple) else self.net(inputs)
            loss = self.task.loss(out, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss.reshape(1), out

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).unsqueeze(1)

    def mechanisms(self, lr: float, probe: Any, failed: list[str | None]) -> list[dict[str, Any] | None]:
        if failed[0] is not None:
            return [None]
        row = mechanisms.gamma_stats(self.role_tensors, lr)
        row["variance_ratio"] = mechanisms.variance_ratios(self.model, probe)
        return [row]

    def stop(self, m: int) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {}


class Fused:
    """A group of runs that differ only in policy and seed, as one fused network."""

    def __init__(self, task: Any, configs: list, ctx: DistContext, compile: bool = False):
        if ctx.distributed:
            raise GammaGuideError("--fuse trains a group in one process; under torchrun use --fuse 1")
        self.task, self.device, self.n = task, ctx.device, len(configs)
        models = []
        for c in configs:
            torch.manual_seed(c.seed)  # each run's initial weights, as when it trains alone
            models.append(task.new_model(c))
        self.reports, decays = [], []
        for c, model in zip(configs, models, strict=True):
            report = analysis.analyze(model, task.example, c.policy, warn=False)
            names = {id(p): name for name, p in model.named_parameters()}
            decay = {names[id(p)]: g["weight_decay"] for g in groups.param_groups(model, c.weight_decay,
                                                                                 report=report) for p in g["params"]}
            self.reports.append(report)
            decays.append(decay)
        fused = FU.fuse_structure(models[0], self.n)
        FU.fuse_states(fused, [m.state_dict() for m in models])
        self.model = fused = task.place(fused)
        # The per-run model the mechanisms are measured on, set up as a lone run sets up its own.
        self.run_model = task.place(models[0])
        self.params = list(fused.parameters())
        self.decays = FU.decay_tensors(fused, decays, models[0])
        self.optimizer = task.optimizer(self.params, configs[0], 0.0)
        self.net = torch.compile(fused) if compile else fused
        self.role_tensors = [mechanisms.role_tensors(self.run_model, r, torch.optim.SGD(
            groups.param_groups(self.run_model, c.weight_decay, report=r, lr=c.lr), lr=c.lr))
            for c, r in zip(configs, self.reports, strict=True)]

    def _fused_batch(self, x: torch.Tensor) -> torch.Tensor:
        x = FU.fuse_inputs(x)
        return x.contiguous(memory_format=torch.channels_last) if self.task.numerics.channels_last else x

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor,
                         alive: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each run's loss ``[N]`` and logits ``[B, N, K]``; leaves each run's own gradients.

        The backward pass starts from the sum of the live runs' mean losses: the gradient of
        run m's parameters is that of run m's loss alone."""
        with self.task.numerics.autocast(self.device):
            out = self.net(self._fused_batch(x))
            losses = self.task.loss(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        live = losses if alive is None else torch.where(alive, losses, torch.zeros_like(losses))
        live.sum().backward()
        return losses, out

    def optimizer_step(self) -> None:
        """SGD with each run's weight decay per parameter."""
        FU.add_weight_decay(self.params, self.decays)
        self.optimizer.step()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self._fused_batch(x.unsqueeze(0).expand(self.n, *x.shape)))

    def unfused_state(self, m: int) -> dict[str, torch.Tensor]:
        """Run m's state dict (views into the fused one)."""
        return FU.unfuse_state(self.model.state_dict(), self.n, m, self.run_model.state_dict())

    def mechanisms(self, lr: float, probe: torch.Tensor, failed: list[str | None]) -> list[dict[str, Any] | None]:
        """|γ| and lr/‖γ‖² from each run's own unfused parameters; var(branch)/var(skip) from one
        traced pass of the group, each add's inputs split into the runs' channel blocks."""
        ratios = FU.variance_ratios(self.model, self._fused_batch(probe.unsqueeze(0).expand(self.n, *probe.shape)),
                                    self.n)
        rows: list[dict[str, Any] | None] = []
        for m in range(self.n):
            if failed[m] is not None:
                rows.append(None)
                continue
            self.run_model.load_state_dict(self.unfused_state(m))  # the γ and weights of run m alone
            rows.append({**mechanisms.gamma_stats(self.role_tensors[m], lr), "variance_ratio": ratios[m]})
        return rows

    def stop(self, m: int) -> None:
        """Zero run m's block (parameters, momentum, BatchNorm statistics) so that its non-finite
        values cannot reach any other run."""
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

    def state(self) -> dict[str, Any]:
        """What a group checkpoint holds to unfuse it (``fused.unfuse_checkpoint``)."""
        return {"run_state": self.run_model.state_dict(), "param_names": [k for k, _ in self.model.named_parameters()]}


def shared_settings(cfg: Any) -> dict[str, Any]:
    """What the runs of one group must have in common: everything but policy and seed."""
    s = asdict(cfg)
    s.pop("policy")
    s.pop("seed")
    return s


def group_key(configs: list) -> str:
    """The id of a group: its runs, in order (its checkpoint is ``group-<key>.pt``)."""
    return run_key({"fused_group": [c.key() for c in configs]})



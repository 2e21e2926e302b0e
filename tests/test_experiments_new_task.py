"""A new task is one module and one registry line (docs/harness.md): a toy task, written here as
that module would be, trains through the same loop, grid and records as the built-in ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gammaguide.experiments import grid, results as R, tasks
from gammaguide.experiments.config import TrainConfig, lr_factor
from gammaguide.experiments.distributed import DistContext
from gammaguide.experiments.task import Task
from gammaguide.experiments.trainer import Trainer

CPU = DistContext(0, 1, 0, torch.device("cpu"))


class PointNet(nn.Module):
    """A residual MLP with a pre-norm block and a final norm: roles residual_last and head."""

    def __init__(self, width: int = 16, classes: int = 3):
        super().__init__()
        self.inp, self.norm, self.out_norm = nn.Linear(2, width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.block = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.block(self.norm(h))
        return self.head(self.out_norm(h))


class Points(Task):
    """Which quadrant-ish class a 2-D point is in: 192 training points, 64 test points."""

    label, about, a_model = "points", "points (--data points)", "a point model"
    config = TrainConfig

    @classmethod
    def claims(cls, spec: str) -> bool:
        return spec.startswith("points")

    @classmethod
    def load(cls, cfg, data_dir=None, progress=True):
        x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
        return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()

    def __init__(self, configs, data, ctx, numerics, fused):
        self.cfg, self.device, self.numerics = configs[0], ctx.device, numerics
        self.x, self.y = data
        self.n_train, self.example, self.lr_factor = 192, self.x[:2], lr_factor

    def new_model(self, cfg):
        return PointNet()

    def optimizer(self, params, cfg, weight_decay):
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=weight_decay)

    def batches(self, epoch):
        order = torch.randperm(self.n_train, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        b = self.cfg.batch_size
        for step in range(self.n_train // b):
            idx = order[step * b:(step + 1) * b]
            yield self.x[idx], self.y[idx], b, b

    def loss(self, out, target):
        return F.cross_entropy(out, target)

    def correct(self, out, target):
        return (out.argmax(1) == target).sum()

    @torch.no_grad()
    def evaluate(self, network, last):
        network.model.eval()
        return [{"test_acc": float((network.model(self.x[192:]).argmax(1) == self.y[192:]).float().mean())}]

    def probe(self):
        return self.x[192:224]


def test_a_new_task_trains_through_the_loop_and_the_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "TASKS", (*tasks.TASKS, Points))  # the registry line
    cfg = TrainConfig(data="points", epochs=2, batch_size=32, lr=0.05, weight_decay=1e-2)
    record = Trainer(cfg, Points.load(cfg), CPU, progress=False).run()
    assert record.status == "ok" and len(record.history) == 2 and 0 <= record.test_acc <= 1
    assert record.roles == {"residual_last": {"count": 1, "decayed": 1}, "head": {"count": 1, "decayed": 0}}
    row = record.history[-1]
    assert set(row["gamma_abs"]) == {"residual_last", "head"} and len(row["variance_ratio"]) == 1
    configs = grid.grid(cfg, ("no_gamma", "all"), (0,))
    grid.run_grid(configs, tmp_path, progress=False, log=lambda m: None)
    lines = R.read_lines(tmp_path / R.RESULTS_NAME)
    assert sorted(r["arm"] for r in lines) == ["all", "no_gamma"] and all(r["status"] == "ok" for r in lines)
    assert next(r for r in lines if r["arm"] == "no_gamma")["roles"]["residual_last"]["decayed"] == 0

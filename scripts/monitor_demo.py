"""The real run behind docs/monitor.md: our ResNet-20 on a class-balanced subset of CIFAR-10,
trained twice from the same seed, once with the `guidelines` groups and once decaying every
parameter (`all`), with gg.Monitor attached; the records go to OUT/<policy>.jsonl and the plots
to OUT/*.png (`gammaguide monitor` draws them).

    OMP_NUM_THREADS=1 nice -n 19 python scripts/monitor_demo.py --out docs/monitor

A plain training loop, as a user writes one: the monitor is the one added line. Same seed, so
both runs start from the same weights and see the same batches, crops and flips.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import gammaguide as gg
from gammaguide.experiments.data import Augment, balanced_indices, epoch_plan, load_dataset
from gammaguide.models import create_model
from gammaguide.monitor_plots import plot_runs


def train(policy: str, data, args) -> tuple[gg.Monitor, float, float]:
    torch.manual_seed(args.seed)
    model = create_model("resnet20")
    aug = Augment(torch.device("cpu"))
    probe = aug.normalize(data.test_x[balanced_indices(data.test_y, 256, 0, "probe")])
    opt = torch.optim.SGD(gg.param_groups(model, args.weight_decay, probe[:2], policy=policy), lr=args.lr,
                          momentum=0.9, nesterov=True)
    steps_per_epoch = len(data.train_y) // args.batch_size
    total = steps_per_epoch * args.epochs
    warmup = steps_per_epoch

    def factor(s: int) -> float:  # one epoch of linear warm-up, then cosine to 0
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    monitor = gg.Monitor(model, opt, probe, every=args.every, probe_every=args.probe_every, total_steps=total)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        plan = epoch_plan(len(data.train_y), args.seed, epoch)
        for b in range(steps_per_epoch):
            idx = plan.order[b * args.batch_size:(b + 1) * args.batch_size]
            x = aug(data.train_x[idx], plan.dy[idx], plan.dx[idx], plan.flip[idx])
            loss = F.cross_entropy(model(x), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"[{policy}] epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    monitor.close()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(aug.normalize(data.test_x[i:i + 500])).argmax(1) == data.test_y[i:i + 500]).sum())
                      for i in range(0, len(data.test_y), 500))
    return monitor, correct / len(data.test_y), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="imagefolder:/work/shared/data/cifar10-jpeg")
    ap.add_argument("--subset", type=int, default=5000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=5e-3)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--probe-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/monitor")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.data, progress=False).subset(args.subset, args.test, seed=0)
    wall = time.perf_counter()
    runs = {}
    for policy in ("guidelines", "all"):
        monitor, acc, seconds = train(policy, data, args)
        path = monitor.to_jsonl(out / f"{policy}.jsonl")
        runs[policy] = [r.to_dict() for r in monitor.history]
        print(f"[{policy}] test accuracy {acc:.4f} on {len(data.test_y)} images, {seconds:.0f} s; "
              f"{len(monitor.history)} records -> {path}; warnings: {len(monitor.warnings)}", flush=True)
        for w in monitor.warnings:
            print(f"  warning: {w}")
    for name, caption in plot_runs(runs, out):
        print(f"{out / name}: {caption}")
    print(f"wall time {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()

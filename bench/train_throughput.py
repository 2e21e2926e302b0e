"""Training images/s of ``gammaguide train`` against a plain PyTorch loop, same process, CPU.

    python bench/train_throughput.py [--model resnet20] [--images 2560] [--repeats 5]

Both loops train the same built-in model (same initial weights) on the same uint8 data tensor
with the same batch size, the same crop-and-flip augmentation and SGD with momentum and weight
decay. The plain loop is what one would write by hand: one parameter group, no schedule, no
bookkeeping. gammaguide's loop adds the policy's parameter groups, the learning-rate schedule,
loss/accuracy accounting and the non-finite check. Epochs alternate between the two (so drift
in the machine's load hits both alike) and the ratio of the medians is printed.
Target (issue 3): gammaguide / plain >= 0.95.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gammaguide.experiments.data import Augment, Dataset, epoch_plan
from gammaguide.experiments.distributed import DistContext
from gammaguide.experiments.train import TrainConfig, Trainer
from gammaguide.models import create_model


def plain_epoch(model, opt, aug, x_all, y_all, batch: int, seed: int, epoch: int) -> float:
    """The hand-written loop; returns images/s."""
    plan = epoch_plan(len(y_all), seed, epoch)
    model.train()
    steps = len(y_all) // batch
    start = time.perf_counter()
    for s in range(steps):
        idx = plan.order[s * batch:(s + 1) * batch]
        x = aug(x_all[idx], plan.dy[idx], plan.dx[idx], plan.flip[idx])
        loss = F.cross_entropy(model(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--images", type=int, default=2560, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="epochs of each loop, alternating")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    n = args.images
    data = Dataset("synthetic", torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (n,), generator=g), torch.zeros(10, 3, 32, 32, dtype=torch.uint8),
                   torch.arange(10), tuple(str(c) for c in range(10)))
    cfg = TrainConfig(model=args.model, data="synthetic", epochs=1000, batch_size=args.batch_size)
    trainer = Trainer(cfg, data, DistContext(0, 1, 0, torch.device("cpu")), progress=False)

    torch.manual_seed(cfg.seed)
    model = create_model(args.model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          foreach=True)
    aug = Augment(torch.device("cpu"))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model}, {n} images/epoch, "
          f"batch {args.batch_size}")
    trainer.train_epoch(0)  # warm-up both: allocator, oneDNN kernels
    plain_epoch(model, opt, aug, data.train_x, data.train_y, args.batch_size, 0, 0)
    ours, plain = [], []
    for r in range(1, args.repeats + 1):
        ours.append(trainer.train_epoch(r)[2])
        plain.append(plain_epoch(model, opt, aug, data.train_x, data.train_y, args.batch_size, 0, r))
        print(f"  epoch {r}: gammaguide {ours[-1]:7.1f} img/s   plain {plain[-1]:7.1f} img/s")
    a, b = statistics.median(ours), statistics.median(plain)
    print(f"\nmedian: gammaguide {a:.1f} img/s, plain loop {b:.1f} img/s, ratio {a / b:.3f} "
          f"(target >= 0.95: {'ok' if a / b >= 0.95 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training images/s of ``gammaguide train`` against a plain PyTorch loop, same process, CPU.

    python bench/train_throughput.py [--model resnet20] [--images 2560] [--repeats 5]

Both loops train the same built-in model (same initial weights) on the same uint8 data tensor
with the same batch size, the same crop-and-flip augmentation and SGD with momentum and weight
decay. The plain loop is what one would write by hand: one parameter group, no schedule, no
bookkeeping. gammaguide's loop adds the policy's parameter groups, the learning-rate schedule,
loss/accuracy accounting and the non-finite check. Epochs alternate between the two (so drift
in the machine's load hits both alike) and the ratio of the medians is printed.
Target (issue 3): gammaguide / plain >= 0.95.

    python bench/train_throughput.py --numerics [--compile] [--seconds 40]

The CPU fast path (issue 20): images/s of the harness's own loop under each numerics setting
(precision, memory format, threads per run, runs at once) against today's default path (float32,
contiguous, one run on all cores), each measured for the same wall time; `--jobs 2` is two
processes training at once, one thread each, and counts their images together.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gammaguide.experiments.data import Augment, Dataset, epoch_plan
from gammaguide.experiments.distributed import DistContext
from gammaguide.experiments.config import TrainConfig
from gammaguide.experiments.trainer import Trainer
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


def _synthetic(n: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset("synthetic", torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (n,), generator=g), torch.zeros(10, 3, 32, 32, dtype=torch.uint8),
                   torch.arange(10), tuple(str(c) for c in range(10)))


def _numerics_rate(model: str, batch: int, seconds: float, precision: str, memory_format: str, threads: int,
                   compile: bool = False, start_line=None, out=None) -> float:
    """Images/s of the harness's training loop under one numerics setting, for ``seconds``."""
    cfg = TrainConfig(model=model, data="synthetic", epochs=1000, batch_size=batch, precision=precision,
                      memory_format=memory_format, threads=threads)
    trainer = Trainer(cfg, _synthetic(20 * batch), DistContext(0, 1, 0, torch.device("cpu")), progress=False)
    trainer.steps_per_epoch = 5
    if compile:
        start = time.perf_counter()
        trainer.net = torch.compile(trainer.model)
        trainer.train_epoch(0)
        print(f"    compile + first steps: {time.perf_counter() - start:.1f} s", flush=True)
    trainer.train_epoch(0)  # warm-up: oneDNN kernels, allocator
    if start_line is not None:
        start_line.wait()
    images, epoch, start = 0, 1, time.perf_counter()
    while time.perf_counter() - start < seconds:
        trainer.train_epoch(epoch)
        images += trainer.steps_per_epoch * batch
        epoch += 1
    rate = images / (time.perf_counter() - start)
    if out is not None:
        out.put(rate)
    return rate


def _parallel_rate(model: str, batch: int, seconds: float, precision: str, memory_format: str, jobs: int) -> float:
    """Images/s of ``jobs`` processes training at once, one thread each, summed."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out, line = ctx.Queue(), ctx.Barrier(jobs)
    procs = [ctx.Process(target=_numerics_rate, args=(model, batch, seconds, precision, memory_format, 1, False,
                                                      line, out)) for _ in range(jobs)]
    for p in procs:
        p.start()
    rates = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def numerics_main(args) -> int:
    import os

    cores = os.cpu_count() or 1
    rows = [("float32", "contiguous", cores, 1), ("float32", "channels_last", cores, 1),
            ("bf16", "contiguous", cores, 1), ("bf16", "channels_last", cores, 1),
            ("bf16", "channels_last", 1, 1), ("float32", "contiguous", 1, cores), ("bf16", "channels_last", 1, cores)]
    print(f"torch {torch.__version__}, {cores} cores, {args.model}, batch {args.batch_size}, {args.seconds:.0f} s "
          f"per row, {args.repeats} rounds (rows interleaved)")
    rates: dict[tuple, list[float]] = {r: [] for r in rows}
    for _ in range(args.repeats):
        for row in rows:
            precision, fmt, threads, jobs = row
            rate = (_parallel_rate(args.model, args.batch_size, args.seconds, precision, fmt, jobs) if jobs > 1 else
                    _numerics_rate(args.model, args.batch_size, args.seconds, precision, fmt, threads))
            rates[row].append(rate)
            print(f"  {precision:8s} {fmt:13s} {threads} thread(s) x {jobs} job(s): {rate:7.1f} img/s", flush=True)
    base = statistics.median(rates[rows[0]])
    print("\nmedian images/s of all runs at once, and the ratio to today's path (float32, contiguous, one run on "
          f"{cores} threads):")
    for row in rows:
        m = statistics.median(rates[row])
        print(f"  {row[0]:8s} {row[1]:13s} {row[2]} thread(s) x {row[3]} job(s): {m:7.1f} img/s  ratio {m / base:.2f}")
    if args.compile:  # compiled against eager, each measured just before it, on all cores and on one
        for threads in sorted({cores, 1}, reverse=True):
            e = _numerics_rate(args.model, args.batch_size, args.seconds, "bf16", "channels_last", threads)
            c = _numerics_rate(args.model, args.batch_size, args.seconds, "bf16", "channels_last", threads,
                               compile=True)
            print(f"  torch.compile, bf16 channels_last, {threads} thread(s): {c:7.1f} img/s, eager {e:7.1f}, "
                  f"compiled / eager {c / e:.2f}, / today's path {c / base:.2f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--images", type=int, default=2560, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="epochs of each loop, alternating")
    parser.add_argument("--numerics", action="store_true", help="the CPU fast path: precision, memory format, jobs")
    parser.add_argument("--compile", action="store_true", help="with --numerics: also torch.compile")
    parser.add_argument("--seconds", type=float, default=30.0, help="with --numerics: seconds per row")
    args = parser.parse_args()
    if args.numerics:
        return numerics_main(args)

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

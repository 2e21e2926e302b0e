"""Aggregate training images/s of a grid: N separate runs, one fused group of N, one solo run.

    python bench/grid_throughput.py [--device cpu|cuda] [--model resnet20] [--n 4] [--batch-size 128]
                                    [--compile] [--seconds 15] [--repeats 3] [--parts abc] [--vmap]

(a) N separate runs the way ``gammaguide ablate --fuse 1 --jobs N`` runs them: N worker processes,
    each with cpu_count // N threads, each a ``trainer.Trainer`` of one run, all training at once
    (``--separate-jobs J``: as ``--jobs J`` runs them, J at a time);
(b) one fused group of N runs in one process, as ``ablate --fuse N --jobs 1`` trains it
    (``trainer.Trainer`` of a group; ``--compile``: torch.compile, compile time printed); with
    ``--fused-jobs J``: J processes (cpu_count // J threads each) of N/J fused runs each, as
    ``ablate --fuse N/J --jobs J`` trains them;
(c) one solo run in one process.
``--threads T`` sets the threads of the single processes of (b) and (c) (default: every CPU, as
the ``ablate`` process itself has).
``--vmap`` adds (d): the same N runs through ``torch.func`` (``stack_module_state`` +
``functional_call`` + ``vmap``, BatchNorm buffers stacked too), the design alternative to (b).

Every part trains the same model, batch size and device on the same synthetic uint8 images with
the real augmentation, loss, per-run weight decay, SGD step and schedule, and is measured only
after a warm-up (oneDNN/cuDNN, allocator, compilation), for ``--seconds`` of training, in its
own fresh process. The parts alternate ``--repeats`` times, so drift in the machine's load hits
them alike; the ratio b/a is printed per round and for the medians.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import replace

import torch

from gammaguide.experiments.data import Dataset
from gammaguide.experiments.distributed import DistContext
from gammaguide.experiments.config import TrainConfig
from gammaguide.experiments.trainer import Trainer

ARMS = ("no_gamma", "only:residual_last", "only:scale_invariant", "only:shortcut", "only:stream", "guidelines",
        "all", "no_norm")


def synthetic(images: int, classes: int = 10) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=g)
    return Dataset("synthetic", x, torch.randint(0, classes, (images,), generator=g),
                   torch.zeros(classes, 3, 32, 32, dtype=torch.uint8), torch.arange(classes),
                   tuple(str(c) for c in range(classes)))


def configs(args, n: int) -> list[TrainConfig]:
    """n runs as a grid has them: arms in turn, then the next seed."""
    base = TrainConfig(model=args.model, data="synthetic", epochs=1000, batch_size=args.batch_size)
    return [replace(base, policy=ARMS[i % len(ARMS)], seed=i // len(ARMS)) for i in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(train_chunk, images_per_chunk: int, seconds: float, start_line=None) -> float:
    train_chunk(0)  # warm-up
    if start_line is not None:
        start_line.wait()  # measure only while every process trains
    images, i, start = 0, 1, time.perf_counter()
    while time.perf_counter() - start < seconds:
        train_chunk(i)
        images += images_per_chunk
        i += 1
    return images / (time.perf_counter() - start)


def solo_process(args, cfg: TrainConfig, threads: int, start_line, out) -> None:
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    trainer = Trainer(cfg, synthetic(args.images), DistContext(0, 1, 0, device), progress=False)
    trainer.steps_per_epoch = chunk = min(args.chunk, trainer.steps_per_epoch)
    out.put(_timed(trainer.train_epoch, chunk * cfg.batch_size, args.seconds, start_line))


def fused_process(args, cfgs: list[TrainConfig], threads: int, start_line, out) -> None:
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    trainer = Trainer(cfgs, synthetic(args.images), DistContext(0, 1, 0, device), progress=False,
                           compile=args.compile)
    trainer.steps_per_epoch = chunk = min(args.chunk, trainer.steps_per_epoch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trainer.train_epoch(0)
    _sync(device)
    first_s = time.perf_counter() - start
    rate = _timed(trainer.train_epoch, chunk * args.batch_size * len(cfgs), args.seconds, start_line)
    extra = {"first_chunk_s": first_s, "compile_s": trainer.compile_s}
    if device.type == "cuda":
        extra["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    out.put((rate, extra))


def vmap_process(args, n: int, threads: int, start_line, out) -> None:
    """The torch.func route: the runs' states stacked along a new leading dimension."""
    import torch.nn.functional as F
    from torch.func import functional_call, stack_module_state, vmap

    torch.set_num_threads(threads)
    device = torch.device(args.device)
    # Build the group as (b) does (initial weights, batches), then stack its runs' states.
    fz = Trainer(configs(args, n), synthetic(args.images), DistContext(0, 1, 0, device), progress=False)
    models = []
    for m in range(n):
        run = copy.deepcopy(fz.network.run_model)
        run.load_state_dict(fz.unfused_state(m))
        models.append(run)
    params, buffers = stack_module_state(models)
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    decays = [torch.full_like(p, 5e-4) for p in params.values()]  # per-element decay (values do not matter here)
    base = copy.deepcopy(models[0]).to("meta")
    opt = torch.optim.SGD(list(params.values()), lr=0.1, momentum=0.9, foreach=True)

    def run_fn(p, b, x):
        return functional_call(base, (p, b), (x,))

    batches = fz.epoch_batches(0)

    def chunk(i: int) -> None:
        nonlocal batches
        for _ in range(min(args.chunk, fz.steps_per_epoch)):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = fz.epoch_batches(i)
                x, y = next(batches)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = vmap(run_fn)(params, buffers, x)  # [N, B, K]
                loss = F.cross_entropy(logits.permute(1, 2, 0), y.t(), reduction="none").mean(0).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                torch._foreach_addcmul_([p.grad for p in params.values()], list(params.values()), decays)
            opt.step()
        _sync(device)

    out.put(_timed(chunk, min(args.chunk, fz.steps_per_epoch) * args.batch_size * n, args.seconds, start_line))


def measure_together(target, args, work: list, threads: int) -> list:
    """Run ``target(args, item, threads, start_line, out)`` for every item in its own process,
    all measuring at once; their results in order of arrival."""
    ctx = mp.get_context("spawn")
    out, line = ctx.Queue(), (ctx.Barrier(len(work)) if len(work) > 1 else None)
    procs = [ctx.Process(target=target, args=(args, item, threads, line, out)) for item in work]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return results


def measure_separate(args, n: int) -> float:
    """``ablate --fuse 1 --jobs J`` keeps J runs training at once, each in a process of
    cpu_count // J threads: their aggregate rate is that of the grid."""
    jobs = min(args.separate_jobs or n, n)
    return sum(measure_together(solo_process, args, configs(args, jobs), max(1, (os.cpu_count() or 1) // jobs)))


def measure_fused(args, n: int) -> tuple[float, dict]:
    cfgs, jobs = configs(args, n), args.fused_jobs
    shares = [cfgs[j::jobs] for j in range(jobs)]
    threads = args.threads if jobs == 1 else max(1, (os.cpu_count() or 1) // jobs)
    results = measure_together(fused_process, args, shares, threads)
    return sum(r for r, _ in results), results[0][1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--n", type=int, default=4, help="runs in the grid")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="torch.compile the fused group (b)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured training time of each part")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="abc", help="which of a, b, c to measure (default abc)")
    parser.add_argument("--vmap", action="store_true", help="also (d): the torch.func vmap route")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads of the one process of (b), (c) and (d) (default: every CPU)")
    parser.add_argument("--separate-jobs", type=int, metavar="J",
                        help="(a) as ablate --jobs J runs it: J runs at once (default N)")
    parser.add_argument("--fused-jobs", type=int, default=1, metavar="J",
                        help="(b) as J processes of N/J fused runs each (default 1)")
    parser.add_argument("--images", type=int, default=2560, help="synthetic training images")
    parser.add_argument("--chunk", type=int, default=10, help="steps between clock checks")
    parser.add_argument("--json", metavar="PATH", help="also append the results as one JSON line to PATH")
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as any bf16-autocast training would leave it

    print(f"torch {torch.__version__}, device {args.device}, {os.cpu_count()} CPUs, {args.model}, batch "
          f"{args.batch_size}, N={args.n}; (a) {min(args.separate_jobs or args.n, args.n)} processes x "
          f"{max(1, (os.cpu_count() or 1) // min(args.separate_jobs or args.n, args.n))} "
          f"threads; (b) {args.fused_jobs} process(es) x "
          f"{args.threads if args.fused_jobs == 1 else max(1, (os.cpu_count() or 1) // args.fused_jobs)} threads, "
          f"{'compiled' if args.compile else 'eager'}; (c) 1 x {args.threads} threads; {args.seconds:.0f} s a part",
          flush=True)
    rows: dict[str, list[float]] = {k: [] for k in "abcd"}
    extras: list[dict] = []
    for r in range(1, args.repeats + 1):
        line = []
        if "a" in args.parts:
            rows["a"].append(measure_separate(args, args.n))
            line.append(f"(a) separate {rows['a'][-1]:8.1f}")
        if "b" in args.parts:
            rate, extra = measure_fused(args, args.n)
            rows["b"].append(rate)
            extras.append(extra)
            info = f" [first chunk {extra['first_chunk_s']:.1f} s"
            if extra.get("compile_s") is not None:
                info += f", compile (first step) {extra['compile_s']:.1f} s"
            if "peak_gib" in extra:
                info += f", peak {extra['peak_gib']:.1f} GiB"
            line.append(f"(b) fused {rows['b'][-1]:8.1f}{info}]")
        if "c" in args.parts:
            rows["c"].append(measure_together(solo_process, args, configs(args, 1), args.threads)[0])
            line.append(f"(c) solo {rows['c'][-1]:8.1f}")
        if args.vmap:
            rows["d"].append(measure_together(vmap_process, args, [args.n], args.threads)[0])
            line.append(f"(d) vmap {rows['d'][-1]:8.1f}")
        if rows["a"] and rows["b"]:
            line.append(f"b/a {rows['b'][-1] / rows['a'][-1]:.2f}")
        print(f"round {r}: " + "   ".join(line) + "  img/s", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    summary = "   ".join(f"({k}) {v:.1f} [{min(rows[k]):.1f}-{max(rows[k]):.1f}]" for k, v in med.items())
    print(f"\nmedian [range] img/s: {summary}")
    if "a" in med and "b" in med:
        print(f"fused / separate (b/a): {med['b'] / med['a']:.2f}")
    if args.json:
        import json

        line = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                "torch": torch.__version__, "model": args.model, "n": args.n, "batch_size": args.batch_size,
                "compile": args.compile, "fused_jobs": args.fused_jobs, "threads": args.threads,
                "seconds": args.seconds, "rates": {k: v for k, v in rows.items() if v}, "median": med,
                "fused_extra": extras}
        with open(args.json, "a") as f:
            f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What gg.Monitor costs a training loop: training time with it over training time without.

    python bench/monitor_overhead.py            # ResNet-20 (CPU) and a small BERT, ~5 minutes on 2 cores
    python bench/monitor_overhead.py --quick    # a smoke run

Three copies of each model train side by side from the same weights on the same batches: one
without a monitor (the baseline), one monitored every 100 steps with a probe every 500 (the
target: <= 1.02), one every step with a probe every 50. They train in blocks of steps in the
order A B C C B A A B C C B A ..., so that slow and fast spells of this shared machine fall on
every arm alike; each arm's time is the sum of its blocks. The monitors are attached (and make
their first record) before timing starts: what is timed is the steady cost per step.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F

import gammaguide as gg

ARMS = {"without": None, "every 100, probe every 500": (100, 500), "every 1, probe every 50": (1, 50)}


def resnet20(batch: int):
    from gammaguide.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20")
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
               for _ in range(4)]
    example = batches[0][0][:16]
    opt = torch.optim.SGD(gg.param_groups(model, 5e-4, example), lr=0.1, momentum=0.9)

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, opt, example, step


def bert(batch: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=512, num_labels=2)
    model = BertForSequenceClassification(config).train()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 1000, (batch, 64), generator=g), torch.randint(0, 2, (batch,), generator=g))
               for _ in range(4)]
    example = {"input_ids": batches[0][0][:4]}
    opt = torch.optim.AdamW(gg.param_groups(model, 0.01, example), lr=1e-4)

    def step(i: int) -> None:
        ids, y = batches[i % len(batches)]
        loss = model(input_ids=ids, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, opt, example, step


def measure(name: str, make, batch: int, block: int, rounds: int) -> dict[str, float]:
    setups, monitors = {}, {}
    for arm, every in ARMS.items():
        model, opt, example, step = make(batch)
        setups[arm] = step
        if every is not None:
            t = time.perf_counter()
            monitors[arm] = gg.Monitor(model, opt, example, every=every[0], probe_every=every[1], warn=False)
            print(f"  {name}: attaching the monitor ({arm}) took {time.perf_counter() - t:.2f} s")
    for step in setups.values():  # warm-up
        for i in range(3):
            step(i)
    warm = {arm: len(m.history) for arm, m in monitors.items()}
    seconds = dict.fromkeys(ARMS, 0.0)
    order = list(ARMS)
    done = dict.fromkeys(ARMS, 0)
    for r in range(rounds):
        for arm in order if r % 2 == 0 else order[::-1]:
            step = setups[arm]
            t = time.perf_counter()
            for _ in range(block):
                step(done[arm])
                done[arm] += 1
            seconds[arm] += time.perf_counter() - t
    base = seconds["without"]
    print(f"{name}: {done['without']} steps per arm in blocks of {block}, "
          f"{1000 * base / done['without']:.1f} ms/step without a monitor")
    ratios = {}
    for arm in ARMS:
        if arm == "without":
            continue
        timed = monitors[arm].history[warm[arm]:]
        records, probes = len(timed), sum(bool(r.variance) for r in timed)
        ratios[arm] = seconds[arm] / base
        print(f"  {arm:<28} {ratios[arm]:.4f}  ({records} records, {probes} probes)")
    for m in monitors.values():
        m.close()
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: few, small steps")
    ap.add_argument("--rounds", type=int, default=4, help="blocks per arm (each arm trains rounds x block steps)")
    ap.add_argument("--block", type=int, default=125, help="steps per block")
    args = ap.parse_args()
    rounds, block = (2, 5) if args.quick else (args.rounds, args.block)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    batch = 8 if args.quick else 64
    measure(f"resnet20 (CPU, batch {batch})", resnet20, batch, block, rounds)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("small BERT: skipped (transformers is not installed)")
        return
    batch = 2 if args.quick else 16
    measure(f"small BERT (4 layers, width 128, batch {batch} x 64 tokens)", bert, batch, block, rounds)


if __name__ == "__main__":
    main()

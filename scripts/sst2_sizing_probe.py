"""Training tokens per CPU-second of candidate SST-2 classifiers: the pilot's sizing tool.

    OMP_NUM_THREADS=1 python scripts/sst2_sizing_probe.py [sst2:PATH]

Trains each candidate (model, width, layers) for 3 x 40 steps of batch 64 on SST-2 with one
thread, after 40 steps of warm-up, and prints real (non-padding) tokens per second of process CPU
time, which is what an idle core would give (wall-clock throughput on a shared machine depends on
the other jobs), and per second of wall time.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import torch

from gammaguide.experiments.distributed import DistContext
from gammaguide.experiments.config import TextConfig
from gammaguide.experiments.text_task import load_data
from gammaguide.experiments.trainer import Trainer as TextTrainer

CANDIDATES = [("textcls_preln", 128, 2), ("textcls_postln", 128, 2), ("textcls_preln", 192, 3),
              ("textcls_preln", 128, 4)]


def main() -> int:
    torch.set_num_threads(1)
    spec = sys.argv[1] if len(sys.argv) > 1 else "sst2:../shared/data/sst2"
    base = TextConfig(data=spec, epochs=1000, policy="all", batch_size=64)
    data = load_data(base)
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    for model, width, layers in CANDIDATES:
        trainer = TextTrainer(replace(base, model=model, width=width, layers=layers), data, ctx, progress=False)
        trainer.steps_per_epoch = 40
        trainer.train_epoch(0)
        cpu, wall, tokens = time.process_time(), time.perf_counter(), trainer.train_items[0]
        for epoch in (1, 2, 3):
            trainer.train_epoch(epoch)
        cpu, wall, tokens = time.process_time() - cpu, time.perf_counter() - wall, trainer.train_items[0] - tokens
        print(f"{model} width {width}, {layers} layers: {tokens / cpu:.0f} tokens per CPU-second, "
              f"{tokens / wall:.0f} per wall-second", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

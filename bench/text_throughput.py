"""Training tokens/s of ``gammaguide train`` on the text classifier against a plain PyTorch loop,
same process, CPU.

    python bench/text_throughput.py [--model textcls_preln] [--sentences 1920] [--repeats 8] [--threads 1]

Both loops train the same model (same initial weights) on the same synthetic token ids (lengths
spread like SST-2's phrases, 2 to 50 tokens) in the same length-bucketed batches, with AdamW and
the same cross-entropy loss. The plain loop is what one would write by hand: one parameter
group, no schedule, no bookkeeping. gammaguide's loop (``Trainer.train_epoch``, what
``gammaguide train --data sst2:...`` runs) adds the policy's parameter groups, the warm-up and
decay schedule, the per-epoch dropout seed, loss/accuracy/token accounting and the non-finite
check. Epochs alternate between the two, the first of each pair alternating too (so drift in
the machine's load hits both alike), and the ratio of the medians is printed.
Target (issue 12): gammaguide / plain >= 0.95.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gammaguide.experiments.distributed import DistContext
from gammaguide.experiments.text_data import CLS, ClassificationData, Tokens
from gammaguide.experiments.config import TextConfig
from gammaguide.experiments.text_task import build_model, length_batches
from gammaguide.experiments.trainer import Trainer as TextTrainer


def synthetic(n: int, vocab: int, seed: int = 0) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 51, (n,), generator=g)
    ids = torch.randint(5, vocab, (n, 50), generator=g)
    ids[:, 0] = CLS
    ids[torch.arange(50)[None, :] >= lengths[:, None]] = 0
    return Tokens(ids, lengths)


def plain_epoch(model, opt, tokens: Tokens, labels: torch.Tensor, batch: int, seed: int, epoch: int) -> float:
    """The hand-written loop; returns real tokens/s."""
    model.train()
    real = 0
    start = time.perf_counter()
    for idx in length_batches(tokens.lengths, batch, seed, epoch):
        width = int(tokens.lengths[idx].max())
        loss = F.cross_entropy(model(tokens.ids[idx, :width]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        real += int(tokens.lengths[idx].sum())
    return real / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="textcls_preln")
    parser.add_argument("--sentences", type=int, default=1920, help="training sentences per epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=8, help="epochs of each loop, alternating")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: PyTorch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = TextConfig(model=args.model, data="sst2:synthetic", epochs=1000, batch_size=args.batch_size,
                     policy="guidelines", weight_decay=0.1)
    vocab = cfg.vocab_size
    train, test = synthetic(args.sentences, vocab), synthetic(64, vocab, seed=1)
    g = torch.Generator().manual_seed(2)
    data = ClassificationData("synthetic", train, torch.randint(0, 2, (args.sentences,), generator=g), test,
                              torch.arange(64) % 2, vocab, tokenizer="")
    trainer = TextTrainer(cfg, data, DistContext(0, 1, 0, torch.device("cpu")), progress=False)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay,
                            foreach=True)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model} (width {cfg.width}, "
          f"{cfg.layers} layers), {args.sentences} sentences/epoch, batch {args.batch_size}")
    trainer.train_epoch(0)  # warm-up both: allocator, oneDNN kernels
    plain_epoch(model, opt, train, data.train_y, args.batch_size, 0, 0)
    ours, plain = [], []
    for r in range(1, args.repeats + 1):
        # Who goes first alternates (ABBA), so a load that rises or falls hits both alike.
        if r % 2:
            ours.append(trainer.train_epoch(r)[2])
            plain.append(plain_epoch(model, opt, train, data.train_y, args.batch_size, 0, r))
        else:
            plain.append(plain_epoch(model, opt, train, data.train_y, args.batch_size, 0, r))
            ours.append(trainer.train_epoch(r)[2])
        print(f"  epoch {r}: gammaguide {ours[-1]:8.0f} tok/s   plain {plain[-1]:8.0f} tok/s", flush=True)
    a, b = statistics.median(ours), statistics.median(plain)
    print(f"\nmedian: gammaguide {a:.0f} tok/s, plain loop {b:.0f} tok/s, ratio {a / b:.3f} "
          f"(target >= 0.95: {'ok' if a / b >= 0.95 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

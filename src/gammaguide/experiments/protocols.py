"""The ablation's arms and protocols: the defaults of a grid, every one overridable on the command line.

A protocol belongs to the task of its config (``tasks.for_config``); ``gammaguide ablate`` with a
task's data and no ``--protocol`` uses that task's first protocol (``Task.protocols``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import TextConfig, TrainConfig

ARMS = ("no_gamma", "only:residual_last", "only:scale_invariant", "only:shortcut", "only:stream",
        "guidelines", "all", "no_norm")


@dataclass(frozen=True)
class Protocol:
    """Defaults of an ablation; every field can be overridden on the command line."""

    name: str
    config: Any  # a TrainConfig or a TextConfig
    seeds: tuple[int, ...]
    about: str
    arms: tuple[str, ...] | None = None  # None: the task's (ARMS, or for text the arms that differ for the model)


_D1 = TrainConfig(model="resnet20", epochs=11, weight_decay=5e-3, schedule="onecycle", epoch_test_subset=2000,
                  precision="bf16", memory_format="channels_last", threads=1)

PROTOCOLS = {
    "smoke": Protocol("smoke", TrainConfig(model="resnet20", epochs=1, subset=320, test_subset=200, batch_size=64,
                                           variance_batch=32), (0,),
                      "a few hundred images, one epoch: checks that everything runs (tests use it)"),
    # Chosen by the pilot in results/cifar10-resnet20-cpu/README.md.
    "cpu": Protocol("cpu", TrainConfig(model="resnet20", epochs=15, subset=10_000, weight_decay=5e-3,
                                       schedule="onecycle", epoch_test_subset=2000), (0, 1, 2),
                    "8 arms x 3 paired seeds in about 2 hours on 2 CPU cores"),
    "gpu": Protocol("gpu", TrainConfig(model="resnet56", epochs=30, weight_decay=5e-4, schedule="cosine"), (0, 1),
                    "the paper's scale: full training set, deep ResNets; several runs at once on one GPU"),
    # Issue 20's pre-registered CPU grids (results/*-resnet20-d1/PROTOCOL.md, weight decay chosen by its
    # pilot): decay time D = 1.09 in 11 epochs; the fast path, one thread a run (--jobs 2).
    "cifar100-d1": Protocol("cifar100-d1", _D1, tuple(range(8)),
                            "CIFAR-100 (cifar100:PATH), all 50,000 images, ResNet-20, 11 epochs, weight decay 5e-3 "
                            "(D = 1.09), bf16 + channels_last, one thread a run: 7 arms x 8 paired seeds",
                            arms=ARMS[:-1]),
    "cifar10-d1": Protocol("cifar10-d1", _D1, tuple(range(8)),
                           "CIFAR-10, the same model and schedule as cifar100-d1: 4 arms x 8 paired seeds",
                           arms=("no_gamma", "only:residual_last", "guidelines", "all")),
    # Text tasks (text_task.py): AdamW with decoupled weight decay, warm-up then decay.
    "sst2-smoke": Protocol("sst2-smoke", TextConfig(data="sst2", epochs=1, subset=320, test_subset=100, batch_size=32,
                                                    width=32, layers=1, heads=2, vocab_size=300, max_len=32,
                                                    variance_batch=16), (0,),
                           "SST-2, a few hundred phrases, a tiny classifier, one epoch: checks that everything runs"),
    # Sized by the pilot in results/sst2-textcls_preln-cpu/README.md; --model textcls_postln for the post-LN grid.
    "sst2-cpu": Protocol("sst2-cpu", TextConfig(data="sst2", epochs=3, batch_size=64, lr=1e-3, weight_decay=0.1,
                                                schedule="linear", warmup_epochs=0.1, width=128, layers=2, heads=4),
                         (0, 1, 2), "SST-2, all 67,349 phrases, 3 epochs, a 2-layer width-128 classifier: 4 arms x "
                                    "3 paired seeds per model, both models in about 2 hours on 2 CPU cores"),
    # fairseq's transformer_iwslt_de_en recipe (post-LN, AdamW betas 0.9/0.98, lr 5e-4, label smoothing
    # 0.1, dropout 0.3) at width 256 and 3+3 layers, with the CPU protocol's weight decay 0.1 (the
    # recipe's 1e-4 would not move a γ within a run); --model seq2seq_preln for the pre-LN grid.
    "multi30k-gpu": Protocol("multi30k-gpu", TextConfig(model="seq2seq_postln", data="multi30k", epochs=20,
                                                        batch_size=128, lr=5e-4, beta2=0.98, weight_decay=0.1,
                                                        schedule="cosine", warmup_epochs=1.0, label_smoothing=0.1,
                                                        width=256, layers=3, heads=4, dropout=0.3, max_len=128,
                                                        epoch_test_subset=200), (0, 1, 2),
                             "Multi30k De-En, all 29,000 pairs, a 3+3-layer width-256 translator; several runs at "
                             "once on one GPU (--jobs, --epochs auto --time-budget S)"),
    "multi30k-smoke": Protocol("multi30k-smoke", TextConfig(model="seq2seq_postln", data="multi30k", epochs=1,
                                                            subset=320, test_subset=50, batch_size=32, width=32,
                                                            layers=1, heads=2, vocab_size=300, max_len=48,
                                                            label_smoothing=0.1, schedule="cosine", dropout=0.1,
                                                            variance_batch=16), (0,),
                               "Multi30k, a few hundred pairs, a tiny translator, one epoch: checks that everything "
                               "runs"),
}

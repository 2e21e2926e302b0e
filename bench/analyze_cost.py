"""Cost of ``gammaguide.analyze`` relative to one eager forward pass, and of a 7B meta analysis.

    python bench/analyze_cost.py            # prints a table; exit status 0

For ResNet-50 (1x3x224x224), ViT-B/16 (1x3x224x224) and a BERT-base config (batch 1, sequence
128) it prints median(analyze) / median(forward) over 5 interleaved repeats in this process, and
as a control the same ratio for a forward pass under an empty TorchDispatchMode (the floor).
The forward pass is timed as analyze runs it: eval mode, no autograd. Then it analyzes a
LLaMA-7B-architecture model built on the meta device and prints the time and the rise in
peak resident memory (peak RSS after the call minus peak RSS before it).
Targets (issue 2): ratio <= 1.2 for all three; meta analysis < 2 s with a rise < 100 MB.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gammaguide as gg


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _models():
    import torchvision
    from transformers import BertConfig, BertModel

    yield "resnet50", torchvision.models.resnet50(), torch.randn(1, 3, 224, 224)
    yield "vit_b_16", torchvision.models.vit_b_16(), torch.randn(1, 3, 224, 224)
    bert = BertModel(BertConfig())  # bert-base-uncased sizes, random weights, no download
    yield "bert-base (seq 128)", bert, {"input_ids": torch.randint(0, 30522, (1, 128))}


def _forward(model, x):
    model.eval()
    with torch.no_grad():
        return model(**x) if isinstance(x, dict) else model(x)


class _EmptyMode(TorchDispatchMode):
    """The floor of any dispatch-mode analysis: every op goes through Python and back, nothing
    is recorded."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _forward_in_empty_mode(model, x):
    with _EmptyMode():
        return _forward(model, x)


def ratio_rows(repeats: int):
    for name, model, x in _models():
        _forward(model, x)
        _forward_in_empty_mode(model, x)
        gg.analyze(model, x, warn=False)  # warm-up: lazy imports, allocator, op caches
        fwd, empty, ana = [], [], []
        for _ in range(repeats):  # interleaved, so drift in machine load hits all alike
            for fn, times in ((_forward, fwd), (_forward_in_empty_mode, empty),
                              (lambda m, i: gg.analyze(m, i, warn=False), ana)):
                t = time.perf_counter()
                fn(model, x)
                times.append(time.perf_counter() - t)
        f, e, a = statistics.median(fwd), statistics.median(empty), statistics.median(ana)
        yield name, f, a, a / f, e / f


def meta_llama_7b():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    ids = torch.zeros(1, 128, dtype=torch.long, device="meta")
    before = _peak_rss_mb()
    t = time.perf_counter()
    report = gg.analyze(model, {"input_ids": ids}, warn=False)
    seconds = time.perf_counter() - t
    rise = _peak_rss_mb() - before
    n_params = sum(p.numel() for p in model.parameters())
    return n_params, len(report.entries), seconds, rise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    # The meta analysis goes first so that its peak-RSS rise is not hidden under the peak the
    # real models leave behind.
    n_params, n_norms, seconds, rise = meta_llama_7b()
    print(f"\n{'model':<22}{'forward ms':>12}{'analyze ms':>12}{'ratio':>8}{'floor':>8}  target <= 1.2")
    for name, f, a, r, floor in ratio_rows(args.repeats):
        print(f"{name:<22}{f * 1e3:>12.1f}{a * 1e3:>12.1f}{r:>8.2f}{floor:>8.2f}  {'ok' if r <= 1.2 else 'MISSED'}")
    print("floor: the same forward pass under an empty TorchDispatchMode (no recording), the least any "
          "dispatch-mode analysis costs")
    print(f"\nLLaMA-7B architecture on meta ({n_params / 1e9:.2f}B params): {n_norms} RMSNorm scales found, "
          f"analyze {seconds:.2f} s (target < 2 s), peak RSS rise {rise:.1f} MB (target < 100 MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

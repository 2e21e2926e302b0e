"""Cost of ``gammaguide.analyze`` relative to one eager forward pass, and of a 7B meta analysis.

    python bench/analyze_cost.py            # prints a table; exit status 0

For ResNet-50, ViT-B/16, MobileNetV3-Small and ShuffleNetV2-x1.0 (1x3x224x224) and a BERT-base
config (batch 1, sequence 128) it prints median(analyze) / median(forward) over 5 interleaved
repeats in this process.
The forward pass is timed as analyze runs it: eval mode, no autograd (the model is put in eval mode
once, before timing: switching the flags of MobileNetV3-Small's 209 modules takes about 0.7 ms, no part of a
forward pass). Three ways of analyzing:
- ratio: ``analyze`` as a user calls it, on meta tensors (shapes.py) with the shape cache and the
  replayed calls (replay.py) warm from an earlier analysis in the process, as in any second analysis;
- cold: the same with both emptied before each call (a first analysis);
- real pass: the forward pass forced to run for real, as for a model that needs values;
and two references: *empty mode*, the forward pass under a TorchDispatchMode that only calls each
op (what intercepting every op costs before anything is recorded: the floor of the real pass), and
*meta floor*, the forward pass on meta twins under a mode that only runs each op on shapes
(``shapes.MetaRunner``, cache warm): what intercepting every aten op on meta costs, the floor of
``analyze`` before replay.py, whose replayed calls skip the aten ops altogether.
The last column, *py probe*, is the median time of a fixed pure-Python loop (building and
summing a dict of 20,000 tuples) timed in the same interleaved repeats: it does not depend on
gammaguide at all, and tells how fast the machine ran Python code during that row
(``--probe-only 20`` runs it alone for 20 s and prints the median of each half second). On a shared
machine it moves by half from one minute to the next, and ``analyze`` (Python over many small
objects) moves with it more than the forward pass (mostly native kernels) does.
``--by-speed N`` instead times N interleaved triples (forward, analyze, probe) of each model picked
(default: the two mobile ones), sorts them by the probe's time and prints the ratio in each quarter:
what the ratio is when the machine runs Python fast and when it runs it slowly.
Then it analyzes a LLaMA-7B-architecture model built on the meta device and prints the time
and the rise in peak resident memory (peak RSS after the call minus peak RSS before it).
Targets: ratio <= 1.2 for ResNet-50, ViT-B/16 and BERT-base (issue 2), <= 1.5 for the two small
mobile models (issue 9); meta analysis < 2 s with a rise < 100 MB. ``--models`` picks some.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
import warnings

import torch
import gammaguide as gg
from gammaguide.analysis import build_report, trace_model
from gammaguide.policy import resolve_policy
from gammaguide.replay import Replayer
from gammaguide.shapes import MetaRunner
from torch.utils._python_dispatch import TorchDispatchMode


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _models():
    import torchvision
    from transformers import BertConfig, BertModel

    yield "resnet50", lambda: torchvision.models.resnet50(), torch.randn(1, 3, 224, 224)
    yield "vit_b_16", lambda: torchvision.models.vit_b_16(), torch.randn(1, 3, 224, 224)
    # bert-base-uncased sizes, random weights, no download
    yield "bert-base (seq 128)", lambda: BertModel(BertConfig()), {"input_ids": torch.randint(0, 30522, (1, 128))}
    yield "mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(), torch.randn(1, 3, 224, 224)
    yield "shufflenet_v2_x1_0", lambda: torchvision.models.shufflenet_v2_x1_0(), torch.randn(1, 3, 224, 224)


TARGETS = {"mobilenet_v3_small": 1.5, "shufflenet_v2_x1_0": 1.5}  # the others: 1.2


def _forward(model, x):
    with torch.no_grad():
        return model(**x) if isinstance(x, dict) else model(x)


def _analyze(model, x):
    gg.analyze(model, x, warn=False)


def _analyze_cold(model, x):
    MetaRunner._cache.clear()
    Replayer._cache.clear()
    gg.analyze(model, x, warn=False)


def _analyze_real(model, x):
    build_report(trace_model(model, x, on_meta=False), resolve_policy("guidelines"))


class _EmptyMode(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # as gammaguide's recorder: no Dynamo-disabling shim per op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _forward_in_empty_mode(model, x):
    with _EmptyMode():
        _forward(model, x)


class _ShapesMode(_EmptyMode):
    def __init__(self):
        super().__init__()
        self.runner = MetaRunner()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.runner(func, args, kwargs)


def _forward_on_meta(model, x):
    mode = _ShapesMode()
    with mode:
        _forward(model, mode.runner.to_meta(x))


def _python_probe(model, x):
    d = {i: (i, str(i)) for i in range(20000)}
    sum(len(v[1]) for v in d.values())


def probe_medians(seconds: float) -> list[float]:
    """The probe alone, median ms of each half second: how steady the machine runs Python."""
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        times, stop = [], time.perf_counter() + 0.5
        while time.perf_counter() < stop:
            t = time.perf_counter()
            _python_probe(None, None)
            times.append(time.perf_counter() - t)
        out.append(statistics.median(times) * 1e3)
    return out


def ratio_rows(repeats: int, only: set[str] | None = None):
    for name, factory, x in _models():
        if only and name.split(" ")[0] not in only:
            continue
        model = factory().eval()
        timed = (_forward, _analyze, _analyze_cold, _analyze_real, _forward_in_empty_mode, _forward_on_meta,
                 _python_probe)
        for fn in timed:  # warm-up: lazy imports, allocator, op caches
            fn(model, x)
        times = {fn: [] for fn in timed}
        for _ in range(repeats):  # interleaved, so drift in machine load hits all alike
            for fn in timed:
                t = time.perf_counter()
                fn(model, x)
                times[fn].append(time.perf_counter() - t)
        f, a, cold, real, empty, meta, probe = (statistics.median(times[fn]) for fn in timed)
        yield name, f, a, a / f, cold / f, real / f, empty / f, meta / f, probe


def by_speed(name: str, factory, x, triples: int) -> list[tuple[float, float, float, float, float]]:
    """(probe, forward, analyze medians in s, ratio of those medians, median of the triples' own
    ratios) for each quarter of ``triples`` interleaved triples, sorted by the probe's time."""
    model = factory().eval()
    timed = (_forward, _analyze, _python_probe)
    for fn in timed:
        fn(model, x)
    rows = []
    for _ in range(triples):
        row = []
        for fn in timed:
            t = time.perf_counter()
            fn(model, x)
            row.append(time.perf_counter() - t)
        rows.append(row)
    rows.sort(key=lambda r: r[2])
    bounds = [len(rows) * q // 4 for q in range(5)]  # four parts, as equal as ``triples`` allows
    out = []
    for q in range(4):
        quarter = rows[bounds[q]:bounds[q + 1]]
        f, a, p = (statistics.median(r[i] for r in quarter) for i in range(3))
        out.append((p, f, a, a / f, statistics.median(r[1] / r[0] for r in quarter)))
    return out


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
    parser.add_argument("--models", default="", help="comma-separated names (resnet50,vit_b_16,bert-base,"
                                                        "mobilenet_v3_small,shufflenet_v2_x1_0); default: all")
    parser.add_argument("--no-llama", action="store_true", help="skip the 7B meta analysis")
    parser.add_argument("--by-speed", type=int, metavar="N", default=0,
                        help="time N interleaved (forward, analyze, probe) triples per model and print the ratio "
                             "in each quarter of them by the probe's time (default models: the two mobile ones)")
    parser.add_argument("--probe-only", type=float, metavar="SECONDS",
                        help="only time the pure-Python probe for SECONDS, printing the median of each half second")
    args = parser.parse_args()
    if args.probe_only:
        print(" ".join(f"{ms:.1f}" for ms in probe_medians(args.probe_only)), "ms")
        return 0
    only = set(filter(None, args.models.split(",")))
    warnings.simplefilter("ignore")
    if args.by_speed:
        if args.by_speed < 4:
            parser.error(f"--by-speed {args.by_speed}: give at least 4 triples (one per quarter), e.g. --by-speed 200")
        only = only or set(TARGETS)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.by_speed} interleaved triples "
              f"per model, in quarters by the py probe's time (fastest machine first)")
        print(f"{'model':<22}{'quarter':>8}{'py probe ms':>13}{'forward ms':>12}{'analyze ms':>12}{'ratio':>8}"
              f"{'per triple':>12}  target")
        for name, factory, x in _models():
            if name.split(" ")[0] not in only:
                continue
            target = TARGETS.get(name, 1.2)
            for q, (p, f, a, r, per) in enumerate(by_speed(name, factory, x, args.by_speed), 1):
                print(f"{name:<22}{q:>8}{p * 1e3:>13.1f}{f * 1e3:>12.1f}{a * 1e3:>12.1f}{r:>8.2f}{per:>12.2f}  "
                      f"<= {target}: {'ok' if r <= target else 'MISSED'}")
        print("ratio: median analyze / median forward within the quarter; per triple: the median of each triple's "
              "own analyze / forward")
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    # The meta analysis goes first so that its peak-RSS rise is not hidden under the peak the
    # real models leave behind.
    if not args.no_llama:
        n_params, n_norms, seconds, rise = meta_llama_7b()
    print(f"\n{'model':<22}{'forward ms':>12}{'analyze ms':>12}{'ratio':>8}{'cold':>8}{'real pass':>11}"
          f"{'empty mode':>12}{'meta floor':>12}  target{'':<13}py probe ms")
    for name, f, a, r, cold, real, empty, meta, probe in ratio_rows(args.repeats, only):
        target = TARGETS.get(name, 1.2)
        verdict = f"<= {target}: {'ok' if r <= target else 'MISSED'}"
        print(f"{name:<22}{f * 1e3:>12.1f}{a * 1e3:>12.1f}{r:>8.2f}{cold:>8.2f}{real:>11.2f}{empty:>12.2f}"
              f"{meta:>12.2f}  {verdict:<19}{probe * 1e3:>11.1f}")
    print("ratio: analyze / forward, shape cache and replayed calls warm; cold: both emptied first; real pass: "
          "the forward pass run for real, as for a model that needs values; empty mode: the forward pass under a "
          "dispatch mode that records nothing (the floor of the real pass); meta floor: the forward pass on meta "
          "twins under a mode that only runs each aten op on shapes (what analyze's replayed calls skip); py probe: "
          "a fixed pure-Python loop, how fast the machine ran Python during the row")
    if not args.no_llama:
        print(f"\nLLaMA-7B architecture on meta ({n_params / 1e9:.2f}B params): {n_norms} RMSNorm scales found, "
              f"analyze {seconds:.2f} s (target < 2 s), peak RSS rise {rise:.1f} MB (target < 100 MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where the time of one ``gammaguide.analyze`` goes, stage by stage, against one eager forward pass.

    python bench/analyze_stages.py                      # MobileNetV3-Small and ShuffleNetV2 x1.0
    python bench/analyze_stages.py --models resnet50 --repeats 21

For each torchvision model (1x3x224x224, eval mode, no autograd) it times, interleaved and in
this process, with the shape cache and the replayed calls warm:
- forward: the eager forward pass;
- traced pass: ``trace`` on meta, as ``analyze`` runs it (recording every op and module call,
  replaying the calls replay.py remembers, module state recorded before and put back after);
- without replay: the same pass with replay.py switched off, every call running its aten ops;
- module state: recording and putting back every module's state alone (module_state.py);
- analyze: the whole call;
and prints the fastest of ``--repeats`` calls of each (the least disturbed by other work on the
machine), and roles = analyze - traced pass (finding norms, sums, walks, the report).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import gammaguide as gg
from gammaguide import trace as tracing
from gammaguide.modtree import ModuleTree
from gammaguide.module_state import snapshot
from gammaguide.trace import gc_paused, trace

from analyze_cost import _forward


def stage_times(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    model.eval()
    tree = ModuleTree(model)
    replaying = tracing.replaying

    def traced_pass():
        with torch.no_grad(), gc_paused():
            trace(model, (x,), {}, modules=tree.every, on_meta=True)

    def without_replay():
        tracing.replaying = lambda *a: None
        try:
            traced_pass()
        finally:
            tracing.replaying = replaying

    def module_state():
        snapshot(m for _, m in tree.every).restore()

    timed = {
        "forward": lambda: _forward(model, x),
        "traced pass": traced_pass,
        "without replay": without_replay,
        "module state": module_state,
        "analyze": lambda: gg.analyze(model, x, warn=False),
    }
    for fn in timed.values():  # warm-up: lazy imports, the shape cache, the replayed calls
        fn()
    best = dict.fromkeys(timed, float("inf"))
    for _ in range(repeats):
        for name, fn in timed.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    best["roles"] = best["analyze"] - best["traced pass"]
    return best


def main() -> int:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v3_small,shufflenet_v2_x1_0",
                        help="comma-separated torchvision model names")
    parser.add_argument("--repeats", type=int, default=41)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fastest of {args.repeats} calls, ms")
    columns = ("forward", "analyze", "traced pass", "without replay", "module state", "roles")
    print(f"{'model':<22}" + "".join(f"{c:>16}" for c in columns))
    for name in filter(None, args.models.split(",")):
        t = stage_times(getattr(torchvision.models, name)(), torch.randn(1, 3, 224, 224), args.repeats)
        print(f"{name:<22}" + "".join(f"{t[c] * 1e3:>16.1f}" for c in columns)
              + f"   analyze / forward {t['analyze'] / t['forward']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

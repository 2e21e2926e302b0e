"""The harness's mechanisms before and after they were moved onto gg.Monitor's functions (issue 21):
the same values, bit for bit, on a tiny ResNet-20 trained a few SGD steps.

    git worktree add /tmp/base21 <commit before the change>
    OMP_NUM_THREADS=1 python scripts/mechanisms_parity.py /tmp/base21/src src

Runs `experiments.mechanisms` (role_tensors, gamma_stats, variance_ratios) from each source tree in
turn, for the `guidelines` and `all` groups (with an lr_scale on the stream γ), and compares the
rows as JSON text (Python's float repr: bit-identical or not). Also checks that measuring leaves
torch's RNG state as it was.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def rows(src: str) -> list[dict]:
    src = os.path.abspath(src)
    for name in [k for k in sys.modules if k == "gammaguide" or k.startswith("gammaguide.")]:
        del sys.modules[name]
    sys.path.insert(0, src)
    try:
        import gammaguide
        from gammaguide import analyze, param_groups
        from gammaguide.experiments import mechanisms
        from gammaguide.models import create_model
    finally:
        sys.path.pop(0)
    assert gammaguide.__file__.startswith(src), gammaguide.__file__
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    out = []
    for policy in ("guidelines", "all"):
        torch.manual_seed(0)
        model = create_model("resnet20")
        report = analyze(model, x[:2], policy, warn=False)
        opt = torch.optim.SGD(param_groups(model, 5e-3, report=report, lr=0.1, lr_scale={"stream": 0.5}), lr=0.1,
                              momentum=0.9)
        rt = mechanisms.role_tensors(model, report, opt)
        for step in range(4):
            model.train()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rng = torch.get_rng_state()
            row = mechanisms.gamma_stats(rt, 0.1 * (step + 1) / 3)
            row["variance_ratio"] = mechanisms.variance_ratios(model, x[:8])
            assert torch.equal(rng, torch.get_rng_state()), "measuring moved the RNG"
            out.append(row)
    return out


def main() -> None:
    old, new = (rows(src) for src in sys.argv[1:3])
    same = json.dumps(old) == json.dumps(new)
    print(f"{len(old)} rows; identical as JSON text: {same}")
    if not same:
        for a, b in zip(old, new, strict=True):
            if json.dumps(a) != json.dumps(b):
                print("old:", json.dumps(a)[:300], "\nnew:", json.dumps(b)[:300])
                break
        sys.exit(1)


if __name__ == "__main__":
    main()

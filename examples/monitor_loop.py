"""gg.Monitor in a plain PyTorch training loop: one added line.

    python examples/monitor_loop.py

Every 2 optimizer steps the monitor records, per role of γ, the mean |γ| and the effective
learning rate lr/‖γ‖² (the paper's analysis 2), the same for the scale-invariant conv weights,
and the decay time Σ lr·λ; every 4 steps also var(branch)/var(skip) at each residual sum on
the probe batch (analysis 1). Random 32x32 images stand in for CIFAR-10 so that it runs offline;
``gammaguide monitor OUT/monitor.jsonl --out OUT`` draws the records.
"""

import tempfile

import torch
from torch.nn import functional as F

import gammaguide as gg
from gammaguide.models import create_model


def main(steps: int = 20, out: str | None = None) -> gg.Monitor:
    torch.manual_seed(0)
    model = create_model("resnet20")
    probe = torch.randn(16, 3, 32, 32)  # a fixed batch: the example input and the variance probe
    optimizer = torch.optim.SGD(gg.param_groups(model, 5e-4, probe), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)

    monitor = gg.Monitor(model, optimizer, probe, every=2, probe_every=4, total_steps=steps)  # the added line

    for _ in range(steps):
        x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    monitor.close()

    with tempfile.TemporaryDirectory() as tmp:
        path = monitor.to_jsonl(f"{out or tmp}/monitor.jsonl")
        print(f"{len(monitor.history)} records -> {path}")
    first, last = monitor.history[0], monitor.history[-1]
    for role, s in last.roles.items():
        print(f"{role:<16} mean |γ| {first.roles[role].gamma_abs:.4f} -> {s.gamma_abs:.4f}  lr/‖γ‖² {s.eff_lr:.2e}  "
              f"decayed {s.decayed}/{s.count}  decay time {s.decay_time:.2e}")
    print(f"scale-invariant weights: {last.weights.count}, lr/‖W‖² {first.weights.eff_lr:.2e} -> "
          f"{last.weights.eff_lr:.2e}")
    probed = [r for r in monitor.history if r.variance][-1]
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in probed.variance.items())
    print(f"var(branch)/var(skip) at step {probed.step}: {ratios}")
    return monitor


if __name__ == "__main__":
    main()

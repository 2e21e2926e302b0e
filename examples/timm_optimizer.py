"""timm's optimizer factory with guideline weight decay.

    python examples/timm_optimizer.py

``gg.create_optimizer`` takes the arguments of ``timm.optim.create_optimizer_v2`` plus the
example inputs to trace, and decays exactly what the guidelines decide.
"""

import timm
import torch

import gammaguide as gg


def main() -> None:
    model = timm.create_model("resnet18", num_classes=10)  # random weights: nothing is downloaded
    x = torch.randn(8, 3, 32, 32)
    report = gg.analyze(model, x[:1])  # trace once, build several optimizers from it
    for opt in ("sgd", "momentum", "adamw", "lamb", "lion"):
        optimizer = gg.create_optimizer(model, opt, lr=1e-3, weight_decay=0.05, report=report)
        sizes = ", ".join(f"{len(g['params'])} tensors with weight_decay={g['weight_decay']:g}"
                          for g in optimizer.param_groups)
        print(f"{opt:>8}: {type(optimizer).__name__}: {sizes}")

    optimizer = gg.create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, example_inputs=x[:1])
    loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (8,)))
    loss.backward()
    optimizer.step()
    print(f"one AdamW step done (loss {loss.item():.3f}); decisions per role:")
    for role, entries in report.by_role().items():
        if entries:
            print(f"  {role:<16} {len(entries):>2} γ  {'decay' if entries[0].decay else 'no decay'}")


if __name__ == "__main__":
    main()

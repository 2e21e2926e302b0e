"""The zero-γ trick (Goyal et al. 2017) for any architecture.

    python examples/zero_init.py

``gg.zero_init`` zeroes the γ whose role is ``residual_last``: every residual branch then
adds nothing and each block starts as the identity. On torchvision's ResNet-50 it picks
exactly the γ that ``zero_init_residual=True`` picks by hand; the same call works on models
that have no such switch.
"""

import torch
import torchvision

import gammaguide as gg
from gammaguide.analysis import residual_variances


def main() -> None:
    x = torch.randn(2, 3, 64, 64)
    model = torchvision.models.resnet50()
    before = residual_variances(model, x)
    names = gg.zero_init(model, x[:1])
    after = residual_variances(model, x)

    by_hand = torchvision.models.resnet50(zero_init_residual=True)
    same = set(names) == {n for n, p in by_hand.named_parameters() if n.endswith("bn3.weight") and not p.any()}
    print(f"zeroed {len(names)} γ ({names[0]}, ..., {names[-1]}); same as zero_init_residual=True: {same}")
    print(f"{'residual add':<12} {'branch/skip variance before':>28} {'after':>8}")
    for b, a in zip(before, after, strict=True):
        print(f"{b.module_name:<12} {b.ratio:>28.3f} {a.ratio:>8.3f}")


if __name__ == "__main__":
    main()

"""Helpers for the experiment tests: a tiny ImageFolder tree made on the spot."""

from __future__ import annotations

from pathlib import Path

import torch


def make_imagefolder(root: Path, per_class: int = 6, test_per_class: int = 3, classes: int = 10,
                     start: int = 0, size: int = 32) -> Path:
    """root/{train,test}/class<c>/<n>.jpg: random colour blocks, a little different per class so
    that a network can learn something from them."""
    from PIL import Image

    g = torch.Generator().manual_seed(1234 + start)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(start, start + n):
                base = torch.tensor([(c * 25) % 256, (c * 60) % 256, (255 - c * 25) % 256])
                noise = torch.randint(-40, 41, (size, size, 3), generator=g)
                pixels = (base + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
    return root

"""Helpers for the experiment tests: a tiny ImageFolder tree made on the spot, and a run
interrupted mid-way."""

from __future__ import annotations

from pathlib import Path

import pytest
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


def interrupt_in_epoch_two(trainer) -> None:
    """Run ``trainer`` (a Trainer or FusedTrainer) and stop it as its second epoch starts, as a
    Ctrl-C would: its checkpoint then holds the first epoch."""
    real_epoch = trainer.train_epoch

    def die_in_epoch_two(epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(epoch)

    trainer.train_epoch = die_in_epoch_two
    with pytest.raises(KeyboardInterrupt):
        trainer.run()

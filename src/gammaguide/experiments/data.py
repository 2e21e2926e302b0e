"""Image classification data as in-memory uint8 tensors, decoded once and cached.

A data SPEC is ``cifar10``, ``cifar100`` (torchvision; downloaded when online, else read from
``--data-dir``) or ``imagefolder:PATH`` (a tree ``PATH/{train,test}/<class>/<image>``, such as
the CIFAR-10 JPEG copy, or a zip archive holding that tree, or a folder holding one such zip);
``cifar100:PATH`` and ``cifar10:PATH`` are the same as ``imagefolder:PATH`` (the CIFAR-100 PNG
zip). ``imagefolder`` without a path, and a relative path that does not exist, are looked up
under the ``GAMMAGUIDE_DATA`` environment variable.

Decoding happens once: the arrays go to a cache file in the user's cache directory, keyed by
the tree's (or zip's) path, its number of images and their total size, so a changed tree is
decoded anew.
Batches are cut from the tensors and augmented (random crop with 4 pixels of zero padding,
horizontal flip) with tensor ops on the training device: no per-image Python work per epoch.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import GammaGuideError
from .progress import bar as progress_bar

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
DATA_ENV = "GAMMAGUIDE_DATA"
CACHE_ENV = "GAMMAGUIDE_CACHE"
CACHE_VERSION = 1

# Per-channel statistics of CIFAR-10's training set (0-1 scale); close enough for CIFAR-100
# and any natural-image folder, and fixed so that runs on different subsets stay comparable.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Dataset:
    """A classification dataset held in memory: images N x 3 x H x W uint8, labels N int64."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> "Dataset":
        """A class-balanced subset (the same for the same ``seed``, whatever the run's seed)."""
        train = balanced_indices(self.train_y, n_train, seed, "train") if n_train else None
        test = balanced_indices(self.test_y, n_test, seed, "test") if n_test else None
        return Dataset(
            self.name,
            self.train_x if train is None else self.train_x[train],
            self.train_y if train is None else self.train_y[train],
            self.test_x if test is None else self.test_x[test],
            self.test_y if test is None else self.test_y[test],
            self.classes,
        )


def balanced_indices(labels: torch.Tensor, n: int, seed: int, split: str) -> torch.Tensor:
    """Sorted indices of ``n`` images, an equal share of each class drawn with ``seed``; raises
    ``GammaGuideError`` (naming ``split``) when that is impossible."""
    classes = int(labels.max()) + 1
    if n < classes or n > len(labels):
        raise GammaGuideError(f"--subset for the {split} set must be between {classes} (one image per class) and "
                              f"{len(labels)} (all of it), got {n}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    per_class = [order[labels[order] == c] for c in range(classes)]
    # Equal shares; the remainder goes to the first classes, one image each.
    share, extra = divmod(n, classes)
    picked = [idx[: share + (c < extra)] for c, idx in enumerate(per_class)]
    short = [c for c, (p, want) in enumerate(zip(picked, (share + (c < extra) for c in range(classes)), strict=True))
             if len(p) < want]
    if short:
        raise GammaGuideError(f"--subset {n} needs {share + 1} {split} images of class {short[0]}, which has fewer; "
                              f"use a smaller subset")
    return torch.cat(picked).sort().values


# ----------------------------------------------------------------------------- specs


def load_dataset(spec: str, data_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Dataset:
    """Load (or decode once and cache) the dataset a SPEC names."""
    spec = spec.strip()
    name, _, arg = spec.partition(":")
    if name in ("cifar10", "cifar100") and not arg:
        return _torchvision_cifar(name, data_dir)
    if name in ("imagefolder", "cifar10", "cifar100"):
        return _imagefolder(resolve_folder(arg or None, data_dir), progress=progress)
    raise GammaGuideError(f"unknown data spec {spec!r}; use cifar10, cifar100, imagefolder:PATH (a folder with "
                          f"train/ and test/ subfolders of class folders, or a zip of them) or cifar100:PATH (the "
                          f"same, e.g. the CIFAR-100 PNG zip)")


def resolve_folder(path: str | None, data_dir: str | os.PathLike | None = None) -> Path:
    """The ImageFolder root: PATH itself, or PATH under --data-dir or $GAMMAGUIDE_DATA; a folder with
    train/ in it, a zip archive, or a folder holding exactly one zip archive."""
    bases = [Path(b) for b in (data_dir, os.environ.get(DATA_ENV)) if b]
    candidates = ([Path(path).expanduser()] if path else []) + [b / path if path else b for b in bases]
    for c in candidates:
        if (c / "train").is_dir():
            return c
        if c.is_file() and zipfile.is_zipfile(c):
            return c
        zips = sorted(c.glob("*.zip")) if c.is_dir() else []
        if len(zips) == 1 and zipfile.is_zipfile(zips[0]):
            return zips[0]
    tried = ", ".join(str(c) for c in candidates) or "nothing (no PATH, no --data-dir, no $GAMMAGUIDE_DATA)"
    raise GammaGuideError(f"no ImageFolder tree with a train/ folder (or zip of one) found; tried {tried}. Give "
                          f"imagefolder:PATH with PATH/train/<class>/*.jpg and PATH/test/<class>/*.jpg (or a zip "
                          f"holding train/ and test/), or set {DATA_ENV}=PATH")


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "gammaguide")
    return Path(base).expanduser()


# ----------------------------------------------------------------------------- torchvision CIFAR


def _torchvision_cifar(name: str, data_dir: str | os.PathLike | None) -> Dataset:
    try:
        import torchvision
    except ImportError:
        raise GammaGuideError("cifar10/cifar100 need torchvision; run: pip install 'gammaguide[experiments]'") \
            from None
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root = Path(data_dir or os.environ.get(DATA_ENV) or cache_dir() / "torchvision").expanduser()
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=False)
        except RuntimeError:
            try:
                ds = cls(str(root), train=train, download=True)
            except Exception as exc:
                raise GammaGuideError(
                    f"{name} is not in {root} and could not be downloaded ({type(exc).__name__}: {exc}); pass "
                    f"--data-dir with the folder holding {cls.base_folder}/, or use imagefolder:PATH") from exc
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits += [x, torch.tensor(ds.targets, dtype=torch.long)]
    return Dataset(name, *splits, tuple(ds.classes))


# ----------------------------------------------------------------------------- ImageFolder


def _list_zip(root: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[str, int]]]]:
    """Classes and (member, label) pairs of a zip holding ``[prefix/]train/<class>/<image>`` and ``test/``."""
    with zipfile.ZipFile(root) as z:
        names = [n for n in z.namelist() if not n.endswith("/") and Path(n).suffix.lower() in IMAGE_SUFFIXES]
    by_split: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for n in names:
        parts = n.split("/")
        if len(parts) >= 3 and parts[-3] in by_split:  # .../<split>/<class>/<file>
            by_split[parts[-3]].append((parts[-2], n))
    classes = tuple(sorted({c for c, _ in by_split["train"]}))
    if not classes:
        raise GammaGuideError(f"{root} holds no train/<class>/<image> members; expected a zip of an ImageFolder tree")
    index = {c: i for i, c in enumerate(classes)}
    files: dict[str, list[tuple[str, int]]] = {}
    for split, items in by_split.items():
        unknown = sorted({c for c, _ in items} - set(index))
        if unknown:
            raise GammaGuideError(f"{root}: {split}/ has class folders that train/ lacks ({', '.join(unknown[:5])})")
        if not items:
            raise GammaGuideError(f"{root} holds no {split}/<class>/<image> members")
        files[split] = sorted(((n, index[c]) for c, n in items), key=lambda t: (t[1], t[0]))
    return classes, files


def _list_tree(root: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[Path, int]]]]:
    train = root / "train"
    classes = tuple(sorted(d.name for d in train.iterdir() if d.is_dir()))
    if not classes:
        raise GammaGuideError(f"{train} has no class folders; expected {train}/<class>/<image files>")
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in ("train", "test"):
        items = []
        for label, cls in enumerate(classes):
            folder = root / split / cls
            if not folder.is_dir():
                if split == "test":
                    raise GammaGuideError(f"{folder} is missing: the test split needs the same class folders as "
                                          f"train/ ({', '.join(classes[:5])}...)")
                continue
            items += [(p, label) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not items:
            raise GammaGuideError(f"{root / split} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files[split] = items
    return classes, files


def _cache_key(root: Path, files: dict[str, list[tuple[Path, int]]]) -> str:
    count = sum(len(v) for v in files.values())
    if root.is_file():  # a zip: its own size stands for its members'
        size = root.stat().st_size
    else:
        size = sum(p.stat().st_size for v in files.values() for p, _ in v)
    text = f"v{CACHE_VERSION}|{root.resolve()}|{count}|{size}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _imagefolder(root: Path, *, progress: bool) -> Dataset:
    classes, files = _list_zip(root) if root.is_file() else _list_tree(root)
    path = cache_dir() / f"imagefolder-{root.resolve().name}-{_cache_key(root, files)}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, weights_only=True)
            return Dataset(f"imagefolder:{root}", blob["train_x"], blob["train_y"], blob["test_x"], blob["test_y"],
                           tuple(blob["classes"]))
        except Exception as exc:  # a cache cut short by a crash: decode again
            warnings.warn(f"ignoring unreadable cache {path} ({type(exc).__name__}); decoding {root} again",
                          stacklevel=2)
    splits = {}
    for split, items in files.items():
        splits[split] = _decode_all(items, split, progress, root if root.is_file() else None)
    blob = {"train_x": splits["train"][0], "train_y": splits["train"][1], "test_x": splits["test"][0],
            "test_y": splits["test"][1], "classes": list(classes)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)  # atomic: a reader sees the whole cache or none
    return Dataset(f"imagefolder:{root}", *splits["train"], *splits["test"], classes)


_ZIPS: dict[str, zipfile.ZipFile] = {}  # per decoding process: the archive, opened once


def _decode(item: tuple[str, int, str | None]) -> tuple[bytes | None, tuple[int, ...] | str]:
    import io

    from PIL import Image

    path, _, archive = item
    try:
        if archive is not None:
            z = _ZIPS.get(archive) or _ZIPS.setdefault(archive, zipfile.ZipFile(archive))
            source = io.BytesIO(z.read(path))
        else:
            source = path
        with Image.open(source) as im:
            im = im.convert("RGB")
            return im.tobytes(), (im.height, im.width)
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _decode_all(items: list[tuple[Path, int]], split: str, progress: bool,
                archive: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    jobs = [(str(p), y, str(archive) if archive else None) for p, y in items]
    workers = min(8, os.cpu_count() or 1)
    bar = progress_bar(len(jobs), f"decoding {split}", "img", progress)
    decoded = []
    with ProcessPoolExecutor(workers) if workers > 1 else _Inline() as pool:
        for out in pool.map(_decode, jobs, chunksize=256):
            decoded.append(out)
            bar.update(1)
    bar.close()
    size = next((s for b, s in decoded if b is not None), None)
    if size is None:
        raise GammaGuideError(f"no image of the {split} split could be decoded (first error: {decoded[0][1]})")
    images, labels = [], []
    for (path, y, _), (raw, info) in zip(jobs, decoded, strict=True):
        if raw is None:
            warnings.warn(f"skipping unreadable image {path} ({info})", stacklevel=2)
            continue
        if info != size:
            warnings.warn(f"skipping {path}: {info[1]}x{info[0]} pixels, the others are {size[1]}x{size[0]}",
                          stacklevel=2)
            continue
        images.append(raw)
        labels.append(y)
    h, w = size
    x = torch.frombuffer(bytearray(b"".join(images)), dtype=torch.uint8).view(len(images), h, w, 3)
    return x.permute(0, 3, 1, 2).contiguous(), torch.tensor(labels, dtype=torch.long)


class _Inline:
    """A stand-in for a process pool on a one-core machine."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items, chunksize=1):
        return map(fn, items)


# ----------------------------------------------------------------------------- batches


class Augment:
    """Random crop (zero padding ``pad``) and horizontal flip of a uint8 batch, then
    normalization, as a few tensor ops on the batch's device."""

    def __init__(self, device: torch.device, pad: int = 4, channels_last: bool = False):
        self.pad = pad
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255)
        self.channels_last = channels_last

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) * self.inv_std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __call__(self, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """``dy``, ``dx`` in [0, 2*pad] pick the crop of each image, ``flip`` (bool) mirrors it."""
        n, _, h, w = x.shape
        p = self.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, w)
        cols = torch.where(flip.view(n, 1), w - 1 - cols, cols) + dx.view(n, 1)
        idx_n = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        idx_c = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        out = padded[idx_n, idx_c, rows, cols.view(n, 1, 1, w)]
        return self.normalize(out)


@dataclass
class EpochPlan:
    """The order of the training images and their augmentation for one epoch.

    Drawn from ``seed`` and ``epoch`` alone, so every arm of an ablation with the same seed sees
    the same batches with the same crops and flips. The permutation is the one
    ``torch.utils.data.DistributedSampler`` draws (``randperm`` seeded with seed + epoch), so
    a multi-process run's ranks together see exactly the single-process run's batches.
    """

    order: torch.Tensor  # positions into the training set
    dy: torch.Tensor
    dx: torch.Tensor
    flip: torch.Tensor


def epoch_plan(n: int, seed: int, epoch: int, pad: int = 4) -> EpochPlan:
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g)
    aug = torch.Generator().manual_seed(1_000_003 * (seed + 1) + epoch)
    shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=aug)
    flip = torch.rand(n, generator=aug) < 0.5
    return EpochPlan(order, shifts[0], shifts[1], flip)

"""Data: decode once and cache, class-balanced subsets, tensor augmentation, epoch plans."""

from __future__ import annotations

import warnings

import pytest
import torch

from gammaguide import GammaGuideError
from gammaguide.experiments import data as D

from experiment_helpers import make_imagefolder


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.setenv(D.CACHE_ENV, str(tmp_path / "cache"))
    return make_imagefolder(tmp_path / "tree", per_class=6, test_per_class=3)


def test_decodes_once_then_reads_the_cache(tree, monkeypatch):
    first = D.load_dataset(f"imagefolder:{tree}", progress=False)
    assert first.train_x.shape == (60, 3, 32, 32) and first.train_x.dtype == torch.uint8
    assert first.test_x.shape == (30, 3, 32, 32)
    assert first.classes == tuple(f"class{c}" for c in range(10))
    assert first.train_y.bincount().tolist() == [6] * 10
    assert len(list(D.cache_dir().glob("*.pt"))) == 1

    def no_decoding(*a, **k):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(D, "_decode_all", no_decoding)
    again = D.load_dataset(f"imagefolder:{tree}", progress=False)
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.test_y, first.test_y)


def test_decoded_pixels_match_the_files(tree):
    from PIL import Image

    ds = D.load_dataset(f"imagefolder:{tree}", progress=False)
    path = sorted((tree / "train" / "class3").iterdir())[2]
    expected = torch.tensor(list(Image.open(path).convert("RGB").getdata()), dtype=torch.uint8)
    index = 3 * 6 + 2  # classes in order, files sorted within a class
    assert torch.equal(ds.train_x[index].permute(1, 2, 0).reshape(-1, 3), expected)
    assert int(ds.train_y[index]) == 3


def test_a_changed_tree_is_decoded_anew(tree):
    D.load_dataset(f"imagefolder:{tree}", progress=False)
    make_imagefolder(tree, per_class=1, test_per_class=0, start=100)  # one more image per class
    ds = D.load_dataset(f"imagefolder:{tree}", progress=False)
    assert len(ds.train_y) == 70
    assert len(list(D.cache_dir().glob("*.pt"))) == 2


def test_corrupt_image_is_skipped_with_a_warning_naming_it(tree):
    bad = tree / "train" / "class0" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        ds = D.load_dataset(f"imagefolder:{tree}", progress=False)
    assert len(ds.train_y) == 60  # the 60 good ones, the bad one left out


def test_folder_found_through_the_environment_variable(tree, monkeypatch):
    monkeypatch.setenv(D.DATA_ENV, str(tree))
    assert len(D.load_dataset("imagefolder", progress=False).train_y) == 60
    monkeypatch.setenv(D.DATA_ENV, str(tree.parent))
    assert len(D.load_dataset(f"imagefolder:{tree.name}", progress=False).train_y) == 60


@pytest.mark.parametrize("spec, message", [
    ("imagenet", "unknown data spec"),
    ("imagefolder:/no/such/folder", "no ImageFolder tree"),
])
def test_bad_specs_say_what_to_do(spec, message, monkeypatch):
    monkeypatch.delenv(D.DATA_ENV, raising=False)
    with pytest.raises(GammaGuideError, match=message):
        D.load_dataset(spec, progress=False)


def test_subset_is_balanced_fixed_and_independent_of_the_run(tree):
    ds = D.load_dataset(f"imagefolder:{tree}", progress=False)
    a = ds.subset(20, 10, seed=0)
    b = ds.subset(20, 10, seed=0)
    c = ds.subset(20, 10, seed=1)
    assert a.train_y.bincount().tolist() == [2] * 10 and a.test_y.bincount().tolist() == [1] * 10
    assert torch.equal(a.train_x, b.train_x)
    assert not torch.equal(a.train_x, c.train_x)
    assert ds.subset(25).train_y.bincount().tolist() == [3] * 5 + [2] * 5
    with pytest.raises(GammaGuideError, match="between 10"):
        ds.subset(5)


def test_augment_is_a_shifted_and_flipped_crop():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    aug = D.Augment(torch.device("cpu"), pad=2)
    centre = torch.full((4,), 2)
    same = aug(x, centre, centre, torch.zeros(4, dtype=torch.bool))
    assert same.shape == (4, 3, 8, 8) and same.dtype == torch.float32
    assert torch.allclose(same, aug.normalize(x))
    flipped = aug(x, centre, centre, torch.ones(4, dtype=torch.bool))
    assert torch.allclose(flipped, aug.normalize(x.flip(-1)))
    # dy = 0 takes the crop two rows up: the first two rows are padding (0 before normalizing)
    up = aug(x, torch.zeros(4, dtype=torch.long), centre, torch.zeros(4, dtype=torch.bool))
    zero = aug.normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))
    assert torch.allclose(up[:, :, :2], zero.expand(4, 3, 2, 8))
    assert torch.allclose(up[:, :, 2:], aug.normalize(x)[:, :, :6])


def test_epoch_plan_is_seeded_and_matches_distributed_sampler():
    a, b = D.epoch_plan(100, seed=3, epoch=1), D.epoch_plan(100, seed=3, epoch=1)
    assert torch.equal(a.order, b.order) and torch.equal(a.dx, b.dx) and torch.equal(a.flip, b.flip)
    assert not torch.equal(a.order, D.epoch_plan(100, seed=3, epoch=2).order)
    assert sorted(a.order.tolist()) == list(range(100))
    assert int(a.dy.min()) >= 0 and int(a.dy.max()) <= 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranks = [list(torch.utils.data.DistributedSampler(range(100), num_replicas=2, rank=r, seed=3))
                 for r in range(2)]
    plan0 = D.epoch_plan(100, seed=3, epoch=0)
    # Step s of both ranks (local batch 5) covers exactly the single-process batch s (size 10).
    for s in range(10):
        union = sorted(ranks[0][5 * s:5 * s + 5] + ranks[1][5 * s:5 * s + 5])
        assert union == sorted(plan0.order[10 * s:10 * s + 10].tolist())

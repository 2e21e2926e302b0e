"""Numerics of a run (precision, memory format, CPU threads): in the key when set, out of it when
not (older results keep their keys), recorded with every run, applied by the trainer; a resumed
grid says when its finished runs used other thread counts. And image data read from a zip."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from experiment_helpers import make_imagefolder

from gammaguide import GammaGuideError
from gammaguide.experiments import grid as ablate, numerics
from gammaguide.experiments import data as D
from gammaguide.experiments.data import Dataset
from gammaguide.experiments.distributed import DistContext
from gammaguide.experiments.config import TextConfig, TrainConfig
from gammaguide.experiments.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CPU = DistContext(0, 1, 0, torch.device("cpu"))


def test_unset_numerics_keep_the_keys_of_committed_results():
    """The committed `cpu` grid was made before these fields existed: its configs still have its keys,
    so rerunning its command skips its finished runs."""
    line = (ROOT / "results/cifar10-resnet20-cpu/results.jsonl").read_text().splitlines()[0]
    rec = json.loads(line)
    cfg = TrainConfig(**rec["settings"])
    assert cfg.precision is None and cfg.memory_format is None and cfg.threads is None
    assert cfg.key() == rec["key"]
    assert "threads" not in cfg.settings() and "precision" not in cfg.settings()


def test_set_numerics_are_part_of_the_key():
    base = TrainConfig(model="resnet20", data="cifar100:/x", epochs=10)
    keys = {base.key(), TrainConfig(**{**base.settings(), "threads": 1}).key(),
            TrainConfig(**{**base.settings(), "threads": 2}).key(),
            TrainConfig(**{**base.settings(), "precision": "bf16"}).key(),
            TrainConfig(**{**base.settings(), "precision": "float32"}).key(),
            TrainConfig(**{**base.settings(), "memory_format": "channels_last"}).key()}
    assert len(keys) == 6
    text = TextConfig(data="sst2:/x")
    assert "threads" not in text.settings() and TextConfig(data="sst2:/x", threads=1).key() != text.key()


@pytest.mark.parametrize("field, value, message", [
    ("precision", "fp16", "--precision"), ("memory_format", "nhwc", "--memory-format"), ("threads", 0, "--threads"),
    ("threads", 1.5, "--threads"),
])
def test_bad_numerics_are_refused_naming_the_option(field, value, message):
    with pytest.raises(GammaGuideError, match=message):
        TrainConfig(**{field: value}).check()


def test_unset_numerics_resolve_to_the_old_behaviour():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert numerics.resolve(TrainConfig(), cpu) == numerics.Numerics("float32", "contiguous", None)
    assert numerics.resolve(TrainConfig(), cuda) == numerics.Numerics("bf16", "channels_last", None)
    fast = TrainConfig(precision="bf16", memory_format="channels_last", threads=1)
    assert numerics.resolve(fast, cpu) == numerics.Numerics("bf16", "channels_last", 1)
    assert numerics.resolve(fast, cuda).threads is None  # threads do not change a GPU run's numbers


def _tiny_data(n: int = 64) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset("synthetic", torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (n,), generator=g), torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8,
                                                                          generator=g),
                   torch.arange(20) % 10, tuple(str(c) for c in range(10)))


def test_the_trainer_applies_and_records_its_numerics():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cfg = TrainConfig(model="resnet20", data="synthetic", epochs=1, batch_size=32, variance_batch=8,
                          precision="bf16", memory_format="channels_last", threads=1)
        trainer = Trainer(cfg, _tiny_data(), CPU, progress=False)
        assert torch.get_num_threads() == 1
        conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        record = trainer.run()
        assert record.status == "ok"
        env = record.environment
        assert (env["precision"], env["memory_format"], env["threads"]) == ("bf16", "channels_last", 1)
        assert record.settings["threads"] == 1 and record.key == cfg.key()
        # the decay time so far, in every epoch's row: lr x weight decay summed over its steps
        steps = trainer.steps_per_epoch
        want = sum(trainer.scheduler.lr_lambdas[0](s) for s in range(steps)) * cfg.lr * cfg.weight_decay
        assert record.history[-1]["decay_time"] == pytest.approx(want)
    finally:
        torch.set_num_threads(before)


def test_bf16_autocast_changes_the_numbers_and_float32_does_not():
    """The precision really acts: two float32 runs agree bit for bit, a bf16 run differs."""
    def first_loss(**kw):
        cfg = TrainConfig(model="resnet20", data="synthetic", epochs=1, batch_size=32, variance_batch=8, **kw)
        return Trainer(cfg, _tiny_data(), CPU, progress=False).train_epoch(0)[0]

    a, b = first_loss(precision="float32"), first_loss(precision="float32")
    c = first_loss(precision="bf16")
    assert a == b and a != c


def _results(path: Path, keys_threads: list[tuple[str, int]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"key": k, "status": "ok", "environment": {"device": "cpu", "threads": t}})
                            + "\n" for k, t in keys_threads))
    return path


def test_a_resumed_grid_says_when_finished_runs_used_other_threads(tmp_path):
    configs = ablate.grid(TrainConfig(data="cifar100:/x", epochs=1), ("no_gamma", "all"), (0, 1))
    results = _results(tmp_path / "results.jsonl", [(configs[0].key(), 2), (configs[1].key(), 2)])
    said: list[str] = []
    ablate._warn_mixed_threads(configs, results, 1, said.append)
    assert len(said) == 1 and "2 with 2 threads" in said[0] and "--threads 2" in said[0]
    said.clear()
    ablate._warn_mixed_threads(configs, results, 2, said.append)  # the same count: nothing to say
    assert said == []
    pinned = [TrainConfig(**{**c.settings(), "threads": 1}) for c in configs]  # threads in the key: no mixing
    ablate._warn_mixed_threads(pinned, results, 1, said.append)
    assert said == []


def _zip_tree(tree: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        for p in sorted(tree.rglob("*")):
            if p.is_file():
                z.write(p, prefix + str(p.relative_to(tree)))
    return archive


def test_a_zip_of_an_imagefolder_tree_reads_as_the_tree(tmp_path, monkeypatch):
    monkeypatch.setenv(D.CACHE_ENV, str(tmp_path / "cache"))
    tree = make_imagefolder(tmp_path / "tree", per_class=3, test_per_class=2, classes=4)
    folder = tmp_path / "cifar100"
    folder.mkdir()
    archive = _zip_tree(tree, folder / "images.zip", prefix="top/")  # members under a top folder, too
    plain = D.load_dataset(f"imagefolder:{tree}", progress=False)
    for spec in (f"cifar100:{archive}", f"cifar100:{folder}", f"imagefolder:{archive}"):
        zipped = D.load_dataset(spec, progress=False)
        assert zipped.classes == plain.classes
        for name in ("train_x", "train_y", "test_x", "test_y"):
            assert torch.equal(getattr(zipped, name), getattr(plain, name)), (spec, name)
    assert len(list((tmp_path / "cache").glob("imagefolder-images.zip-*.pt"))) == 1  # decoded once, cached


def test_a_zip_without_a_train_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(D.CACHE_ENV, str(tmp_path / "cache"))
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("images/a.png", b"")
    with pytest.raises(GammaGuideError, match="train/<class>/<image>"):
        D.load_dataset(f"cifar100:{archive}", progress=False)

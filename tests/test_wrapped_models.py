"""Wrapped and sharded models get the same decisions as the bare model.

DDP, FSDP (``use_orig_params=True``) and FSDP2 (``fully_shard``) run on CPU with the gloo
backend: two processes rendezvous through a file in ``tmp_path`` (no network port), each
writes what it saw to a JSON file, and the tests below compare those with the bare model.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gammaguide as gg
from gammaguide.models import BasicBlock, create_model

WORLD = 2
X = (4, 3, 32, 32)


def clean(name: str) -> str:
    """The bare model's name of a wrapped model's parameter (FSDP1 units nest anywhere)."""
    name = name.replace("_fsdp_wrapped_module.", "").removeprefix("_orig_mod.")
    return name.removeprefix("module.")


def decisions(model: nn.Module, groups: list[dict]) -> dict[str, float]:
    """Bare parameter name -> weight decay of its group; fails if a parameter is in two groups."""
    names = {id(p): clean(n) for n, p in model.named_parameters()}
    out: dict[str, float] = {}
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            assert name not in out, f"{name} in two groups"
            out[name] = g["weight_decay"]
    return out


def bare_model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20")


def _analyze(model: nn.Module, x: torch.Tensor) -> dict:
    report = gg.analyze(model, x, warn=False)
    groups = gg.param_groups(model, 5e-4, x, report=report)
    return {
        "decisions": decisions(model, groups),
        "roles": {clean(e.param_name): e.role for e in report.entries},
        "shapes": {clean(p.name): list(p.shape) for p in report.params},
        "groups": groups,
    }


def _worker(rank: int, store: str, out_dir: str) -> None:
    # Spawned: one process of the gloo group. Writes rank<r>.json with what it saw.
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.manual_seed(rank)
    x = torch.randn(*X)
    seen: dict[str, dict] = {}
    try:
        ddp = nn.parallel.DistributedDataParallel(bare_model())
        seen["ddp"] = _analyze(ddp, x)

        fsdp1 = FSDP(bare_model(), use_orig_params=True, device_id=torch.device("cpu"),
                     auto_wrap_policy=ModuleWrapPolicy({BasicBlock}))
        seen["fsdp1"] = _analyze(fsdp1, x)
        seen["fsdp1"]["local_shapes"] = {clean(n): list(p.shape) for n, p in fsdp1.named_parameters()}

        fsdp2 = bare_model()
        for block in fsdp2.modules():
            if isinstance(block, BasicBlock):
                fully_shard(block)
        fully_shard(fsdp2)
        seen["fsdp2"] = _analyze(fsdp2, x)
        # The groups hold the sharded parameters: one training step must go through them.
        before = {n: p.full_tensor().clone() for n, p in fsdp2.named_parameters()}
        opt = torch.optim.SGD(seen["fsdp2"]["groups"], lr=0.1, momentum=0.9)
        fsdp2(x).square().mean().backward()
        opt.step()
        seen["fsdp2"]["changed"] = sorted(
            n for n, p in fsdp2.named_parameters() if not torch.equal(p.full_tensor(), before[n])
        )
        seen["fsdp2"]["param_names"] = [n for n, _ in fsdp2.named_parameters()]

        flat = FSDP(bare_model(), use_orig_params=False, device_id=torch.device("cpu"))
        try:
            gg.param_groups(flat, 5e-4, x)
            seen["fsdp1_flat_error"] = None
        except gg.GammaGuideError as exc:
            seen["fsdp1_flat_error"] = str(exc)
    finally:
        dist.destroy_process_group()
    for s in seen.values():
        if isinstance(s, dict):
            s.pop("groups", None)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> list[dict]:
    """What each of the two ranks saw (spawned once for the whole module)."""
    tmp = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, start_method="spawn")
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def bare() -> dict:
    return _analyze(bare_model(), torch.randn(*X))


def test_bare_model_has_every_role_worth_comparing(bare):
    # Otherwise "same decisions" below could hold trivially.
    assert {"stream", "scale_invariant", "residual_last", "shortcut"} <= set(bare["roles"].values())
    assert set(bare["decisions"].values()) == {0.0, 5e-4}


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp1", "fsdp2"])
def test_wrapped_model_gets_the_bare_decisions(distributed, bare, wrapper):
    for rank, seen in enumerate(distributed):
        assert seen[wrapper]["roles"] == bare["roles"], f"rank {rank}"
        assert seen[wrapper]["decisions"] == bare["decisions"], f"rank {rank}"


def test_fsdp1_shards_are_reported_with_their_whole_shapes(distributed, bare):
    for seen in distributed:
        fsdp1 = seen["fsdp1"]
        # Between steps FSDP keeps 1-D shards; the weights must still count as weights.
        assert fsdp1["local_shapes"]["layers.0.0.conv1.weight"] != bare["shapes"]["layers.0.0.conv1.weight"]
        assert fsdp1["shapes"] == bare["shapes"]


def test_fsdp2_groups_train_the_sharded_parameters(distributed):
    for seen in distributed:
        fsdp2 = seen["fsdp2"]
        assert fsdp2["changed"] == sorted(fsdp2["param_names"])


def test_fsdp1_flat_parameters_are_refused_with_a_way_out(distributed):
    for seen in distributed:
        assert "use_orig_params=True" in seen["fsdp1_flat_error"]


def test_syncbatchnorm_gets_the_batchnorm_roles(bare):
    # DDP refuses SyncBatchNorm on CPU ("SyncBatchNorm layers only work with GPU modules"),
    # and analysis runs in eval mode where it needs no process group: test it unwrapped.
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(bare_model())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in sync.modules()) == 21
    got = _analyze(sync, torch.randn(*X))
    assert got["roles"] == bare["roles"]
    assert got["decisions"] == bare["decisions"]


def test_data_parallel_and_compile_wrappers_keep_their_prefix(bare):
    for wrapped in (nn.DataParallel(bare_model()), torch.compile(bare_model())):
        report = gg.analyze(wrapped, torch.randn(*X), warn=False)
        names = {n for n, _ in wrapped.named_parameters()}
        assert {e.param_name for e in report.entries} <= names
        assert _analyze(wrapped, torch.randn(*X))["decisions"] == bare["decisions"]

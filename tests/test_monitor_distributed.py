"""gg.Monitor under DDP and FSDP2 on CPU (gloo, two processes that rendezvous through a file).

DDP: rank 0 records and no rank runs a collective for the monitor (a collective on rank 0 alone
would hang: the spawn has a timeout). FSDP2: every rank joins the whole-parameter norms, and rank
0's records equal those of the bare model with the same weights.
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
from torch.nn import functional as F

import gammaguide as gg
from gammaguide.models import BasicBlock, create_model

WORLD = 2
X = (4, 3, 16, 16)


def bare_model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20")


def _summary(mon: gg.Monitor) -> list[dict]:
    return [r.to_dict() for r in mon.history]


def _worker(rank: int, store: str, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    x = torch.randn(*X, generator=torch.Generator().manual_seed(1))
    seen: dict = {}
    try:
        ddp = nn.parallel.DistributedDataParallel(bare_model())
        opt = torch.optim.SGD(gg.param_groups(ddp, 5e-3, x), lr=0.1, momentum=0.9)
        with gg.Monitor(ddp, opt, x, every=1, probe_every=1) as mon:
            for _ in range(2):
                F.cross_entropy(ddp(x + rank), torch.arange(X[0]) % 10).backward()
                opt.step()
                opt.zero_grad()
        seen["ddp"] = {"records": _summary(mon), "step": mon.step,
                       "params": {n: p.detach().sum().item() for n, p in ddp.named_parameters()}}

        fsdp2 = bare_model()
        for block in fsdp2.modules():
            if isinstance(block, BasicBlock):
                fully_shard(block)
        fully_shard(fsdp2)
        opt = torch.optim.SGD(gg.param_groups(fsdp2, 5e-3, x), lr=0.1)
        mon = gg.Monitor(fsdp2, opt, x, every=1, probe_every=1)
        F.cross_entropy(fsdp2(x), torch.arange(X[0]) % 10).backward()
        opt.step()
        mon.close()
        seen["fsdp2"] = {"records": _summary(mon), "sharded": mon._sharded}
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, start_method="spawn",
                             join=False)
    while not ctx.join(timeout=600):  # raises if a rank failed; a hang ends in the test's failure below
        pass
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_ddp_rank_zero_records_and_the_others_only_count_steps(ranks):
    zero, one = ranks[0]["ddp"], ranks[1]["ddp"]
    assert [r["step"] for r in zero["records"]] == [0, 1, 2] and zero["step"] == 2
    assert one["records"] == [] and one["step"] == 2
    assert zero["params"] == one["params"]  # DDP kept the ranks in step: the monitor took nothing from them
    assert zero["records"][-1]["weights"]["count"] == 21 and zero["records"][-1]["variance"]


def test_fsdp2_records_whole_parameter_norms_on_rank_zero(ranks):
    zero, one = ranks[0]["fsdp2"], ranks[1]["fsdp2"]
    assert zero["sharded"] and one["records"] == []
    # The bare model with the same weights and optimizer gives the same first record.
    model = bare_model()
    x = torch.randn(*X, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(gg.param_groups(model, 5e-3, x), lr=0.1)
    want = gg.Monitor(model, opt, x, every=1, probe_every=1, warn=False).history[0].to_dict()
    got = zero["records"][0]
    assert [r["step"] for r in zero["records"]] == [0, 1]
    assert got["variance"].keys() == want["variance"].keys()
    for role, stats in want["roles"].items():
        for key, value in stats.items():
            assert got["roles"][role][key] == pytest.approx(value, rel=1e-5), (role, key)
    for key, value in want["weights"].items():
        assert got["weights"][key] == pytest.approx(value, rel=1e-5), key
    for name, value in want["variance"].items():
        assert got["variance"][name] == pytest.approx(value, rel=1e-4), name

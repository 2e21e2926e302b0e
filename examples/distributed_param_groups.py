"""Guideline groups for DDP, FSDP and FSDP2 models, on CPU with the gloo backend.

    torchrun --nproc_per_node=2 examples/distributed_param_groups.py

Call ``gg.param_groups`` on every rank, after wrapping: for FSDP it gathers the shards
once (a collective), and the groups hold the parameters the optimizer must see.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

import gammaguide as gg
from gammaguide.models import BasicBlock, create_model


def summary(model: nn.Module, groups: list[dict]) -> str:
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = [names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    return f"{len(decayed)} of {len(names)} tensors decayed, e.g. {decayed[2]}"


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)

    ddp = nn.parallel.DistributedDataParallel(create_model("resnet20"))
    fsdp = FSDP(create_model("resnet20"), use_orig_params=True, device_id=torch.device("cpu"),
                auto_wrap_policy=ModuleWrapPolicy({BasicBlock}))
    fsdp2 = create_model("resnet20")
    for block in fsdp2.modules():
        if isinstance(block, BasicBlock):
            fully_shard(block)
    fully_shard(fsdp2)

    for label, model in (("bare", create_model("resnet20")), ("DDP", ddp), ("FSDP", fsdp), ("FSDP2", fsdp2)):
        groups = gg.param_groups(model, 5e-4, x[:1])
        optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
        model(x[rank::2]).logsumexp(1).mean().backward()
        optimizer.step()
        if rank == 0:
            print(f"{label:>5}: {summary(model, groups)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Sharded models: every original parameter whole and in its module for one traced forward pass.

The tracer names a parameter by the tensor object its module holds while it runs, and the
policy tells weights from γ by their number of dimensions. Both break under FSDP, which
keeps only a flat shard of each parameter between steps and swaps other tensors in while
a module runs. ``whole_parameters`` undoes that for the duration of one analysis:

- FSDP2 (``fully_shard``): ``unshard()`` every FSDP module first, so the unsharded
  parameters are registered (and seen by the tracer) under their usual names; ``reshard()``
  afterwards. DTensor parameters keep their global shape, so shapes need no help.
- FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``): ``summon_full_params`` puts
  the full data into the very parameter objects the optimizer holds; the forward of every
  nested FSDP unit is bypassed while tracing, because it would swap those parameters for
  plain views again. Outside this context the parameters are 1-D shards, so the full shapes
  are handed back to the caller.
- FSDP1 with ``use_orig_params=False`` flattens γ, β and weights into one tensor, so no
  per-parameter decision can be expressed: that is an error.

Unsharding and ``summon_full_params`` are collectives: every rank must analyze the model.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterable, Iterator

from torch import nn

from .errors import GammaGuideError


@contextlib.contextmanager
def whole_parameters(model: nn.Module, modules: Iterable[nn.Module] | None = None
                     ) -> Iterator[dict[int, tuple[int, ...]]]:
    """Within the block, every parameter of ``model`` is whole; yields id -> full shape of
    every parameter object as the optimizer will hold it. ``modules``: ``model.modules()``, when
    the caller has walked them."""
    # Without torch.distributed.fsdp imported, nothing can be sharded by it: skip the import.
    # (Not a module at all is for ``unwrap`` to explain.)
    if "torch.distributed.fsdp" not in sys.modules or not isinstance(model, nn.Module):
        yield {}
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel as FSDP

    fsdp1, fsdp2 = [], []
    for m in model.modules() if modules is None else modules:
        if isinstance(m, FSDP):
            fsdp1.append(m)
        elif isinstance(m, FSDPModule):
            fsdp2.append(m)
    if not fsdp1 and not fsdp2:
        yield {}
        return
    flat = [m for m in fsdp1 if not getattr(m, "_use_orig_params", True)]
    if flat:
        raise GammaGuideError(
            f"{type(model).__name__} is wrapped by FullyShardedDataParallel with use_orig_params=False: its "
            f"parameters are flattened into tensors that mix γ, β and weights, so no per-parameter weight decay "
            f"can be set. Wrap it with FullyShardedDataParallel(..., use_orig_params=True), or shard it with "
            f"torch.distributed.fsdp.fully_shard."
        )
    with contextlib.ExitStack() as stack:
        for root in FSDP.fsdp_modules(model, root_only=True):
            stack.enter_context(FSDP.summon_full_params(root, writeback=False, with_grads=False))
            for unit in root.modules():
                if isinstance(unit, FSDP):
                    unit.forward = unit.module.forward  # an instance attribute shadows FSDP.forward
                    stack.callback(delattr, unit, "forward")
        for m in fsdp2:
            m.unshard()
            stack.callback(m.reshard)
        yield {id(p): tuple(p.shape) for p in model.parameters()} if fsdp1 else {}


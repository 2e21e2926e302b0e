"""What ``gg.Monitor`` measures, as plain functions: ‖p‖², mean |γ| and lr/‖p‖² per role, and
var(branch)/var(skip) at every residual sum, with the model's state and every RNG put back.

The ablation harness records its mechanisms with the same functions
(``experiments/mechanisms.py``): one implementation.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .analysis import residual_variances

__all__ = ["squared_norms", "role_stats", "mean_eff_lr", "variance_ratios"]

def _local(p: torch.Tensor) -> torch.Tensor:
    """The part of ``p`` this process holds: a DTensor's (FSDP2) local shard, else ``p``."""
    to_local = getattr(p, "to_local", None)
    return to_local() if callable(to_local) else p


@torch.no_grad()
def squared_norms(params: Sequence[torch.Tensor], sharded: bool = False) -> list[float]:
    """‖p‖² of each parameter, in float32 (one device sync for all of them). ``sharded``: the
    parameters are FSDP shards; the shards' sums are added over the ranks (one all-reduce, a
    collective every rank must join), giving whole-parameter norms."""
    if not params:
        return []
    local = [_local(p).detach() for p in params]
    device = local[0].device
    sq = torch.stack([t.float().pow(2).sum().to(device) for t in local])
    if sharded:
        torch.distributed.all_reduce(sq)
    return sq.tolist()


@torch.no_grad()
def _mean_abs(params: Sequence[torch.Tensor], sharded: bool = False) -> float:
    """Mean |x| over every element of ``params`` together."""
    local = [_local(p).detach() for p in params]
    device = local[0].device
    if not sharded:
        return float(torch.cat([t.float().abs().flatten().to(device) for t in local]).mean())
    sums = torch.stack([torch.stack([t.float().abs().sum(), torch.tensor(float(t.numel()), device=t.device)]).to(device)
                        for t in local]).sum(0)
    torch.distributed.all_reduce(sums)
    total, count = sums.tolist()
    return total / count if count else float("nan")


def mean_eff_lr(params: Sequence[torch.Tensor], lr_of: Callable[[torch.Tensor], float],
                sq: Sequence[float] | None = None, sharded: bool = False) -> float:
    """Mean over ``params`` of lr/‖p‖², with ``lr_of(p)`` the learning rate its group steps it with
    and ``sq`` their ``squared_norms`` when already known."""
    if sq is None:
        sq = squared_norms(params, sharded)
    vals = [lr_of(p) / max(s, 1e-12) for p, s in zip(params, sq, strict=True)]
    return sum(vals) / len(vals)


def role_stats(gammas: Mapping[str, Sequence[torch.Tensor]], lr_of: Callable[[torch.Tensor], float],
               sharded: bool = False) -> dict[str, dict[str, float]]:
    """Per role (in the mapping's order): ``gamma_abs`` (mean |γ| over all elements of the role's γ),
    ``gamma_norm`` (mean over its γ vectors of ‖γ‖) and ``eff_lr`` (mean over its γ vectors of
    lr/‖γ‖², ``lr_of(γ)`` the learning rate its group steps it with)."""
    out = {}
    for role, ps in gammas.items():
        if not ps:
            continue
        sq = squared_norms(ps, sharded)
        out[role] = {
            "gamma_abs": _mean_abs(ps, sharded),
            "gamma_norm": sum(math.sqrt(s) for s in sq) / len(sq),
            "eff_lr": mean_eff_lr(ps, lr_of, sq),
        }
    return out


def variance_ratios(model: nn.Module, batch: Any) -> dict[str, float]:
    """var(branch) / var(skip) at each residual sum, from one traced forward pass on ``batch`` in
    eval mode (``residual_variances``), keyed by the module whose forward makes the sum (a second
    sum in one module gets a ' appended). The model's mode, BatchNorm statistics and everything
    else its forward stores are put back (``residual_variances``); so are the RNGs (Python's,
    NumPy's, torch's CPU and CUDA generators), and autocast is off for the pass."""
    with _rngs_kept(model), _no_autocast():
        found = residual_variances(model, batch)
    out: dict[str, float] = {}
    for rv in found:
        key = rv.module_name or "<model>"
        while key in out:  # two residual adds in one module (a transformer block)
            key += "'"
        out[key] = rv.ratio
    return out


@contextlib.contextmanager
def _rngs_kept(model: nn.Module) -> Iterator[None]:
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    py = random.getstate()
    np_random = sys.modules.get("numpy.random")
    np_state = np_random.get_state() if np_random is not None else None
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py)
        if np_state is not None:
            np_random.set_state(np_state)


@contextlib.contextmanager
def _no_autocast() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if device == "cuda" and not torch.cuda.is_available():
                continue
            stack.enter_context(torch.autocast(device, enabled=False))
        yield

"""N runs of one architecture as one network ("horizontal fusion"), exactly as N separate runs.

Activations are laid out ``[batch, N*C, H, W]``, channel block m belonging to run m:

- a convolution becomes one grouped convolution (weight ``[N*C_out, C_in/g, k, k]``, ``groups=N*g``);
- a BatchNorm becomes one ``BatchNorm2d(N*C)``: per-channel batch statistics in this layout are
  per-run statistics, and ``running_mean[m*C:(m+1)*C]`` is run m's own, in train and eval mode;
- a linear head becomes a batched matmul (weight ``[N, out, in]``), giving logits ``[batch, N, out]``;
- ReLU, residual additions and average pooling act per channel and stay as they are.

Runs are never stacked along the batch dimension (that would mix their BatchNorm statistics).
The loss is the sum over runs of each run's mean loss, so the gradient of run m's parameters is
exactly that of its own loss. Weight decay is a tensor per fused parameter whose block m holds
run m's decay (from the analysis of the unfused model under run m's policy); it is added to the
gradient before a stock ``torch.optim.SGD`` step with ``weight_decay=0``, which is what SGD with
per-group weight decay computes. State dicts and momentum buffers unfuse by a shape rule
(``unfuse_tensor``): a fused tensor with one more dimension than the run's is stacked, one with
the same number is concatenated along dimension 0, a scalar is shared.

This module holds the model side (fuse, unfuse, decay tensors, the fusability check); a group is
trained by the one training loop (``trainer.py``) through ``network.Fused``.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GammaGuideError
from ..models import create_model


class FusedLinear(nn.Module):
    """N linear layers as one batched matmul: ``[B, N*in] -> [B, N, out]``."""

    def __init__(self, n: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.n, self.in_features, self.out_features = n, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(n, out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.n, self.in_features).transpose(0, 1)  # [N, B, in]
        if self.bias is None:
            out = torch.bmm(x, self.weight.transpose(1, 2))
        else:
            out = torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))
        return out.transpose(0, 1)  # [B, N, out]

    def extra_repr(self) -> str:
        return f"n={self.n}, in_features={self.in_features}, out_features={self.out_features}"


# Modules with no parameters that act on each channel alone: they work on the fused layout as is.
_CHANNEL_LOCAL = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Identity, nn.Dropout,
                  nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Flatten)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _fused_leaf(module: nn.Module, n: int, name: str) -> nn.Module:
    meta = torch.device("meta")  # no initialization work: fuse_states fills every tensor
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise GammaGuideError(f"cannot fuse {name} ({module}): padding_mode {module.padding_mode!r}; only "
                                  f"zero padding fuses")
        return nn.Conv2d(n * module.in_channels, n * module.out_channels, module.kernel_size, module.stride,
                         module.padding, module.dilation, n * module.groups, module.bias is not None, device=meta)
    if type(module) in (nn.BatchNorm2d, nn.BatchNorm1d):
        if not (module.affine and module.track_running_stats):
            raise GammaGuideError(f"cannot fuse {name} ({module}): only affine BatchNorm with running "
                                  f"statistics fuses")
        return type(module)(n * module.num_features, module.eps, module.momentum, device=meta)
    if isinstance(module, nn.Linear):
        return FusedLinear(n, module.in_features, module.out_features, module.bias is not None).to(meta)
    if isinstance(module, _CHANNEL_LOCAL):
        return copy.deepcopy(module)
    raise GammaGuideError(f"cannot fuse module {name!r} ({type(module).__name__}): fusion knows Conv2d, "
                          f"BatchNorm, Linear and channel-wise activations/pooling; train this model with --fuse 1")


def fuse_structure(template: nn.Module, n: int) -> nn.Module:
    """A module computing ``n`` copies of ``template`` side by side (tensors uninitialized: see
    ``fuse_states``).

    The template's own classes are kept (their ``forward`` runs unchanged on the fused layout);
    each leaf is swapped for its fused form. Raises ``GammaGuideError`` naming the first module
    that has no fused form."""
    fused = copy.deepcopy(template)
    for name, module in list(fused.named_modules()):
        for child_name, child in list(module.named_children()):
            if next(child.children(), None) is not None or isinstance(child, _CONTAINERS):
                continue
            full = f"{name}.{child_name}" if name else child_name
            setattr(module, child_name, _fused_leaf(child, n, full))
    own = [k for k, _ in fused.named_parameters(recurse=False)] + [k for k, _ in fused.named_buffers(recurse=False)]
    if own or next(fused.children(), None) is None:
        raise GammaGuideError(f"cannot fuse {type(template).__name__}: parameters or buffers held outside "
                              f"submodules ({', '.join(own) or 'no submodules'}); train it with --fuse 1")
    device = next(template.parameters(), torch.empty(0)).device
    return fused.to_empty(device=device)


# ----------------------------------------------------------------------------- state: fuse and unfuse


def fuse_tensor(parts: list[torch.Tensor], fused_like: torch.Tensor) -> torch.Tensor:
    """The fused form of one tensor of each run (see ``unfuse_tensor``)."""
    one = parts[0]
    if fused_like.dim() == one.dim() + 1:
        return torch.stack(parts)
    if one.dim() == 0:
        return one.clone()
    return torch.cat(parts)


def unfuse_tensor(fused: torch.Tensor, n: int, m: int, run_like: torch.Tensor) -> torch.Tensor:
    """Run m's part of a fused tensor: a view (no copy)."""
    if fused.dim() == run_like.dim() + 1:
        return fused[m]
    if run_like.dim() == 0:
        return fused
    size = fused.shape[0] // n
    return fused[m * size:(m + 1) * size]


def fuse_states(fused: nn.Module, states: list[dict[str, torch.Tensor]]) -> None:
    """Load the runs' state dicts (same keys, one per run) into the fused module."""
    target = fused.state_dict()
    merged = {k: fuse_tensor([s[k] for s in states], v) for k, v in target.items()}
    fused.load_state_dict(merged)


def unfuse_checkpoint(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Run key -> {"model": its state dict, "momentum": {parameter name: buffer}} from a group
    checkpoint: what each run would have saved alone."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    run_state, n = state["run_state"], len(state["members"])
    out = {}
    for m, key in enumerate(state["members"]):
        model = unfuse_state(state["model"], n, m, run_state)
        momentum = {}
        for i, name in enumerate(state["param_names"]):  # the optimizer numbers them in this order
            buf = state["optimizer"]["state"].get(i, {}).get("momentum_buffer")
            if buf is not None:
                momentum[name] = unfuse_tensor(buf, n, m, run_state[name]).clone()
        out[key] = {"model": {k: v.clone() for k, v in model.items()}, "momentum": momentum}
    return out


def unfuse_state(fused_state: dict[str, torch.Tensor], n: int, m: int,
                 run_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run m's state dict (views into ``fused_state``), with ``run_state`` giving the shapes."""
    return {k: unfuse_tensor(fused_state[k], n, m, v) for k, v in run_state.items()}


# ----------------------------------------------------------------------------- weight decay


def decay_tensors(fused: nn.Module, run_params: list[dict[str, float]], template: nn.Module) -> list[torch.Tensor]:
    """One tensor per fused parameter (in ``fused.parameters()`` order) whose block m holds run m's
    weight decay for that parameter; ``run_params[m]`` maps parameter name -> decay of run m."""
    shapes = dict(template.named_parameters())
    out = []
    for name, p in fused.named_parameters():
        parts = [torch.full_like(shapes[name], wd[name], dtype=p.dtype, device=p.device) for wd in run_params]
        out.append(fuse_tensor(parts, p))
    return out


def add_weight_decay(params: Iterable[torch.Tensor], decays: list[torch.Tensor]) -> None:
    """grad += decay * param, the first line of ``torch.optim.SGD``'s step with a per-element decay."""
    with torch.no_grad():
        pairs = [(p.grad, p, d) for p, d in zip(params, decays, strict=True) if p.grad is not None]
        if pairs:
            grads, ps, ds = (list(t) for t in zip(*pairs, strict=True))
            torch._foreach_addcmul_(grads, ps, ds)


# ----------------------------------------------------------------------------- inputs and losses


def fuse_inputs(x: torch.Tensor) -> torch.Tensor:
    """``[N, B, C, H, W]`` (run m's batch at m) -> the fused layout ``[B, N*C, H, W]``."""
    n, b = x.shape[:2]
    return x.transpose(0, 1).reshape(b, n * x.shape[2], *x.shape[3:])


def run_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each run's mean cross-entropy, ``[N]``, from logits ``[B, N, K]`` and targets ``[N, B]``."""
    return F.cross_entropy(logits.permute(0, 2, 1), targets.t(), reduction="none").mean(0)


# ----------------------------------------------------------------------------- mechanisms


def variance_ratios(fused: nn.Module, x: torch.Tensor, n: int) -> list[dict[str, float]]:
    """Each run's var(branch) / var(skip) at every residual addition, as
    ``mechanisms.variance_ratios`` gives it for the run alone, from one traced forward pass of
    the fused model (eval mode, its statistics untouched) on the fused batch ``x``: each add's
    inputs are split into the runs' channel blocks and each block's variance taken alone."""
    from ..analysis import trace_model

    traced = trace_model(fused, x, observe_adds=lambda t: _block_variances(t, n))
    out: list[dict[str, float]] = [{} for _ in range(n)]
    for r in traced.flow.residual_adds():
        seen = traced.graph.add_observations.get(r.node)
        if seen is None:
            continue
        skip, branch = seen[r.skip_arg], seen[1 - r.skip_arg]
        for m in range(n):
            key = r.module_name or "<model>"
            while key in out[m]:  # two residual adds in one module
                key += "'"
            out[m][key] = branch[m] / skip[m] if skip[m] > 0 else float("nan")
    return out


def _block_variances(t, n: int) -> list[float]:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 2 or t.shape[1] % n:
        return [float("nan")] * n
    blocks = t.detach().float().reshape(t.shape[0], n, -1).transpose(0, 1).reshape(n, -1)
    if blocks.shape[1] < 2:
        return [float("nan")] * n
    return blocks.var(dim=1).tolist()


# ----------------------------------------------------------------------------- the fusability check


_CHECKED: set[str] = set()  # models whose fusability was checked in this process


def check_model_fuses(name: str, num_classes: int) -> None:
    """Once per process and model: raise ``GammaGuideError`` naming what keeps it from fusing."""
    if name in _CHECKED:
        return
    torch.manual_seed(0)
    check_fusable(create_model(name, num_classes=num_classes), torch.randn(2, 3, 32, 32))
    _CHECKED.add(name)


def check_fusable(template: nn.Module, example: torch.Tensor, n: int = 2) -> None:
    """Raise ``GammaGuideError`` naming the module whose forward mixes runs' channels.

    ``fuse_structure`` only knows the leaves; a ``forward`` that reshapes across channels,
    concatenates or averages over them would silently mix runs. So: build ``n`` copies with
    different weights and statistics, run them fused and apart on the same input, and compare
    every module's output. The first output (in the order they complete) that differs names the
    culprit. Mixing changes outputs by their own size, so a loose float32 tolerance suffices; eval
    mode keeps it so (a training-mode BatchNorm over a batch of 2 at 1x1 pixels would amplify
    rounding to order one). Training-mode BatchNorm is exact by construction (one statistic per
    channel) and tested as such."""
    x = example.float()
    runs = []
    for m in range(n):
        model = copy.deepcopy(template).float()
        norms = [mod for mod in model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
        with torch.no_grad():
            for p in model.parameters() if m else ():  # run 0 keeps the template's weights
                p.add_(0.1 * torch.randn_like(p))
            saved = [mod.momentum for mod in norms]
            for mod in norms:  # running statistics of this input: each layer's output stays of order one
                mod.momentum = 1.0
            model.train()(x)
            for mod, momentum in zip(norms, saved, strict=True):
                mod.momentum = momentum
        runs.append(model.eval())
    fused = fuse_structure(template, n).float().eval()
    fuse_states(fused, [r.state_dict() for r in runs])
    per_run = [_module_calls(r, x) for r in runs]
    try:
        calls = _module_calls(fused, x.repeat(1, n, *([1] * (x.dim() - 2))))
    except Exception as exc:
        raise GammaGuideError(f"cannot fuse {type(template).__name__}: its forward fails on the fused layout "
                              f"({type(exc).__name__}: {exc}); train it with --fuse 1") from None

    def agree(fused_t: torch.Tensor | None, i: int, which: int) -> bool:
        for m in range(n):
            want = per_run[m][i][which] if i < len(per_run[m]) else None
            if (fused_t is None) != (want is None):
                return False
            got = None if want is None else _run_block(fused_t, n, m, want)
            if want is not None and (got is None or not torch.allclose(
                    got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))):
                return False
        return True

    for i, (name, x_in, out) in enumerate(calls):
        # The culprit takes agreeing inputs and gives a differing output; a module fed by it
        # gets differing inputs and is not to blame.
        if not agree(out, i, 2) and agree(x_in, i, 1):
            raise GammaGuideError(f"cannot fuse {type(template).__name__}: the forward of "
                                  f"{name or type(template).__name__!r} mixes the channels of different runs (its "
                                  f"fused output differs from each run's own); only channel-local ops fuse; "
                                  f"train it with --fuse 1")


def _module_calls(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor | None, torch.Tensor | None]]:
    """(module name, first input, output) of every module call, in the order the calls complete."""
    names = {mod: name for name, mod in model.named_modules()}
    calls: list[tuple[str, torch.Tensor | None, torch.Tensor | None]] = []

    def record(mod, inputs, out):
        first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        calls.append((names[mod], first if first is None else first.detach().clone(),
                      out.detach() if isinstance(out, torch.Tensor) else None))

    handles = [mod.register_forward_hook(record) for mod in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def _run_block(out: torch.Tensor, n: int, m: int, want: torch.Tensor | None) -> torch.Tensor | None:
    if want is None:
        return None
    if out.dim() == want.dim() + 1 and out.shape[1] == n:  # [B, N, ...] from a FusedLinear
        return out[:, m]
    if out.dim() == want.dim() and out.dim() >= 2 and out.shape[1] == n * want.shape[1]:
        c = want.shape[1]
        return out[:, m * c:(m + 1) * c]
    return None

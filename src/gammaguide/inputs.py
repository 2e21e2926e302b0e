"""Everything about getting one forward pass to run: unwrapping, example inputs, model state."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from .errors import GammaGuideError
from .modtree import ModuleTree
from .trace import _iter_tensors

DEFAULT_IMAGE_SIZE = (3, 224, 224)


def unwrap(model: nn.Module) -> nn.Module:
    """The module that really computes: inside ``torch.compile``, DDP, DataParallel and FSDP."""
    if not isinstance(model, nn.Module):
        if type(model).__name__ == "ExportedProgram":
            raise GammaGuideError("expected a torch.nn.Module, got an ExportedProgram; pass program.module(), or the "
                                  "model before torch.export")
        raise GammaGuideError(
            f"expected a torch.nn.Module, got {type(model).__name__}; pass the model itself (not its state_dict "
            f"or its parameters)"
        )
    m = model
    for _ in range(16):
        cls = type(m).__name__
        if cls == "OptimizedModule" and isinstance(getattr(m, "_orig_mod", None), nn.Module):
            m = m._orig_mod
        elif isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            m = m.module
        elif cls == "FullyShardedDataParallel" and isinstance(getattr(m, "module", None), nn.Module):
            m = m.module
        else:
            return m
    return m


def _model_device_dtype(params) -> tuple[torch.device | None, torch.dtype]:
    """The one device of all parameters (None if they are on several or there are none), and
    the dtype of the last floating-point parameter (float32 if there is none)."""
    params = list(params)
    devices = {p.device for p in params}
    # Searched from the end: the last parameter is almost always floating point.
    dtype = next((p.dtype for p in reversed(params) if p.is_floating_point()), torch.float32)
    return (devices.pop() if len(devices) == 1 else None), dtype


def default_input_size(model: nn.Module) -> tuple[int, ...] | None:
    """(C, H, W) for image models: timm's ``pretrained_cfg['input_size']`` if the model has
    one, else 3x224x224 when its first layer is a 2-D convolution; None otherwise."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(int(s) for s in cfg["input_size"])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (m.in_channels, *DEFAULT_IMAGE_SIZE[1:])
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv3d, nn.MultiheadAttention)):
            return None
    return None


def prepare_inputs(model: nn.Module, example_inputs: Any, tree: ModuleTree | None = None) -> tuple[tuple, dict]:
    """Normalize ``example_inputs`` to (args, kwargs) on the model's device.

    A tensor is one positional input, a tuple is the positional inputs, a dict is keyword
    inputs, and a list is passed as one positional input (as detection models expect).
    ``tree``: the model's walked modules, when the caller has them.
    """
    # (``named_parameters``: the report walks that list anyway.)
    params = [p for _, p in tree.named_parameters] if tree is not None else model.parameters()
    device, dtype = _model_device_dtype(params)
    if example_inputs is None:
        size = default_input_size(model)
        if size is None:
            raise GammaGuideError(
                f"example_inputs is required for {type(model).__name__}: only image models (first layer a Conv2d, "
                f"or a timm pretrained_cfg) get a default input. Pass a tensor, a tuple of positional inputs or a "
                f"dict of keyword inputs, e.g. {{'input_ids': torch.zeros(1, 16, dtype=torch.long)}}"
            )
        example_inputs = torch.zeros((1, *size), dtype=dtype, device=device or "cpu")
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, tuple):
        args, kwargs = example_inputs, {}
    elif isinstance(example_inputs, dict):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise GammaGuideError(f"keyword example_inputs need string keys, got {bad!r}")
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, list):
        args, kwargs = (example_inputs,), {}
    else:
        raise GammaGuideError(
            f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
            f"got {type(example_inputs).__name__}"
        )
    if device is not None and device.type != "meta" and any(t.is_meta for t in _iter_tensors((args, kwargs))):
        raise GammaGuideError(
            f"example_inputs ({', '.join(describe_inputs(args, kwargs))}) are on the meta device but the model's "
            f"parameters are on {device}; pass real tensors, e.g. torch.zeros(shape), or build the model on the "
            f"meta device too (with torch.device('meta'): model = ...)"
        )
    if device is not None and any(t.device != device for t in _iter_tensors((args, kwargs))):
        args, kwargs = _to_device((args, kwargs), device)
    return args, kwargs


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def describe_inputs(args: tuple, kwargs: dict) -> list[str]:
    """One ``label: dtype[shape]`` string per input tensor (or value)."""
    parts: list[str] = []

    def one(label: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            parts.append(f"{label}: {str(value.dtype).removeprefix('torch.')}{list(value.shape)}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                one(f"{label}[{i}]", v)
        elif isinstance(value, dict):
            for k, v in value.items():
                one(f"{label}.{k}", v)
        else:
            parts.append(f"{label}: {type(value).__name__}")

    for i, a in enumerate(args):
        one(f"args[{i}]", a)
    for k, v in kwargs.items():
        one(k, v)
    return parts


@contextlib.contextmanager
def eval_without_side_effects(model: nn.Module, tree: ModuleTree | None = None) -> Iterator[None]:
    """Trace in eval mode without gradients; afterwards every module's train/eval flag is
    exactly as before. (Buffers the forward pass writes, such as running statistics of a norm
    that updates them in eval mode too, are put back by ``trace`` itself.) ``tree``: the
    model's walked modules, when the caller has them."""
    modes = [(m, m.training) for m in (tree.modules if tree is not None else model.modules())]
    try:
        if any(training for _, training in modes):  # a model already in eval mode needs no switch
            try:
                model.eval()
            except NotImplementedError:  # torch.export's module: its mode was fixed when it was exported
                pass
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            if m.training is not training:  # Module.__setattr__ is slow: touch only what changed
                m.training = training

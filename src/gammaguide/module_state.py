"""Put back what a traced forward pass stores on the model's modules.

A forward pass may keep things on its modules: an anchor generator its anchors, a rotary
embedding its cos/sin tables (as new buffers), a block an attention mask built on first use,
all on the device of the input it saw. After the meta pass those would be meta tensors and
the model's next forward pass would fail on them (so would the real pass that ``analyze``
runs when the meta pass fails). ``snapshot`` records, before the pass, every module's class,
its attribute dictionary (``__dict__``: parameters, buffers, submodules and hooks live in
dicts inside it) and the contents of every dict, list and set reachable from it through
dicts, lists and tuples. ``ModuleState.restore`` then puts back each attribute that was
reassigned, removes each one that was added, and refills each container that changed, in
place, so that the model holds exactly the objects it held before. A lazy module
(``nn.LazyLinear``) that the pass materialized is made lazy again, its parameters
uninitialized: its first real forward pass initializes them as if there had been no analysis.

Only references are recorded, never tensor values: copying is a few list and dict copies per
module. The values of tensors written in place (a counter, a cache filled with ``copy_``) are
put back by the tracer (``trace._Recorder``), which ``ModuleState.tensors`` tells which
tensors besides parameters and buffers are module state. The one exception: which parameter
objects a module sharded by FSDP2 holds is FSDP's business (it swaps them around every forward
pass), so those parameter dicts are left to it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from operator import is_not
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedTensorMixin

_MAX_DEPTH = 8  # nested containers deeper than this are not followed
_CONTAINERS = (dict, list, tuple, set)
# Values that hold nothing to restore in place: skipped at once (most of a module's attributes).
_ATOMS = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size})
# What nn.Module.__init__ puts in every module's __dict__: its flag, its dicts of parameters,
# buffers and submodules, and its hook dicts (almost always empty). The rest is the subclass's own.
_INTERNALS = frozenset(vars(nn.Module()))
_OWN_DICTS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
_HOOK_DICTS = tuple(sorted(k for k in _INTERNALS if "_hooks" in k))


@dataclass
class ModuleState:
    """What ``snapshot`` recorded; ``restore`` puts it back."""

    classes: list[tuple[nn.Module, type]] = field(default_factory=list)
    attrs: list[tuple[dict, dict]] = field(default_factory=list)  # (module.__dict__, its copy)
    containers: list[tuple[Any, Any]] = field(default_factory=list)  # (dict, list or set, its copy)
    empty: list[Any] = field(default_factory=list)  # containers that were empty (most hook dicts)
    tensors: set[int] = field(default_factory=set)  # ids of tensors kept on modules besides their parameters
    # Parameters and buffers of lazy modules not yet materialized: (tensor, its class, its data).
    uninitialized: list[tuple[torch.Tensor, type, torch.Tensor]] = field(default_factory=list)
    # Filled by ``restore``: id -> the shape each of those took during the pass.
    materialized: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def restore(self) -> None:
        for module, cls in self.classes:
            if type(module) is not cls:  # a lazy module turns itself into its concrete class
                module.__class__ = cls
        for t, cls, data in self.uninitialized:
            if type(t) is not cls:  # materialized by the pass: the model's first real call does it
                self.materialized[id(t)] = tuple(t.shape)
                t.data = data
                t.__class__ = cls
        if any(self.empty):  # in C: almost always nothing to do
            for container in self.empty:
                if container:
                    container.clear()
        for container, copy in self.containers:
            if _changed(container, copy):
                container.clear()
                if isinstance(container, list):
                    container.extend(copy)
                else:
                    container.update(copy)
        for attrs, copy in self.attrs:
            if _changed(attrs, copy):
                # Straight into __dict__: Module.__setattr__ would file tensors and modules anew.
                attrs.clear()
                attrs.update(copy)


def _changed(container: Any, copy: Any) -> bool:
    """Does ``container`` hold other objects than ``copy``? By identity (an equal new tensor is
    still another object), compared in C: this runs for every module's attributes."""
    if len(container) != len(copy):
        return True
    if isinstance(container, dict):
        return container.keys() != copy.keys() or any(map(is_not, container.values(), copy.values()))
    if isinstance(container, list):
        return any(map(is_not, container, copy))
    return container != copy  # a set: same length, compare members


def snapshot(modules: Iterable[nn.Module]) -> ModuleState:
    """Record the state of every module in ``modules`` (repeats are fine). This runs on every
    analysis, so nn.Module's own attributes are taken by name and in C where possible."""
    state = ModuleState()
    seen: set[int] = set()
    classes, attrs, containers, empty = state.classes, state.attrs, state.containers, state.empty
    modules = list(modules)
    sharded = _fsdp2_managed(modules)
    for m in modules:
        if id(m) in seen:
            continue
        seen.add(id(m))
        d = m.__dict__
        classes.append((m, type(m)))
        attrs.append((d, d.copy()))
        for value in map(d.get, _OWN_DICTS if id(m) not in sharded else _OWN_DICTS[1:]):
            if value:
                containers.append((value, value.copy()))
            elif value is not None:
                empty.append(value)
        hooks = list(map(d.get, _HOOK_DICTS))
        if any(hooks):  # a registered hook: keep the contents of that module's hook dicts
            for value in hooks:
                _record(value, state, seen, 0)
        else:
            empty.extend(hooks)
        for name in d.keys() - _INTERNALS:  # the subclass's own attributes (set difference, in C)
            value = d[name]
            if type(value) not in _ATOMS and not _atom_tuple(value):
                _record(value, state, seen, 0)
        if isinstance(m, LazyModuleMixin):
            state.uninitialized += [(t, type(t), t.data) for t in (*m._parameters.values(), *m._buffers.values())
                                    if isinstance(t, UninitializedTensorMixin)]
    return state


def _atom_tuple(value: Any) -> bool:
    """A tuple of atoms (a conv's ``kernel_size``, ``stride``, ``padding``): nothing in it can change."""
    return type(value) is tuple and all(type(v) in _ATOMS for v in value)


def _fsdp2_managed(modules: list[nn.Module]) -> set[int]:
    """Modules whose parameters FSDP2 (``fully_shard``) registers itself: it swaps the unsharded
    ones in before a forward pass and the sharded ones back after it, and keeps track of which are
    in. Their parameter dicts are FSDP's to restore (``sharding.whole_parameters`` reshards)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # never imported: nothing is sharded by it
    cls = getattr(fsdp, "FSDPModule", None)
    if cls is None:
        return set()
    return {id(sub) for m in modules if isinstance(m, cls) for sub in m.modules()}


def _record(obj: Any, state: ModuleState, seen: set[int], depth: int) -> None:
    """Record the contents of the containers in ``obj`` and note the tensors in it. Modules are
    recorded by ``snapshot`` on their own; other objects are not looked into."""
    if isinstance(obj, torch.Tensor):
        state.tensors.add(id(obj))
        return
    if depth > _MAX_DEPTH or not isinstance(obj, _CONTAINERS) or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        state.containers.append((obj, obj.copy() if type(obj) is dict else dict(obj)))
        values: Iterable[Any] = obj.values()
    elif isinstance(obj, list):
        state.containers.append((obj, list(obj)))
        values = obj
    elif isinstance(obj, set):
        state.containers.append((obj, set(obj)))
        return  # its members are hashable: no containers to follow
    else:
        values = obj  # a tuple cannot change, but what it holds can
    for v in values:
        if type(v) not in _ATOMS:
            _record(v, state, seen, depth + 1)

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

Only references are recorded, never tensor values. This runs on every analysis, over hundreds
of modules and thousands of attributes, so both steps work on whole lists at once in C (``map``,
``chain``): ``snapshot`` flattens the keys and values of all the plain dicts into two lists, and
``restore`` first asks whether the dicts still hold exactly those (values by identity, all dicts
in one comparison) and looks at them one by one only if not. The values of tensors written in place (a
counter, a cache filled with ``copy_``) are put back by the tracer (``trace._Recorder``), which
``ModuleState.tensors`` tells which tensors besides parameters and buffers are module state.
The one exception: which parameter objects a module sharded by FSDP2 holds is FSDP's business
(it swaps them around every forward pass), so those parameter dicts are left to it.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import chain, filterfalse
from operator import is_not, itemgetter
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedTensorMixin

from .ops import IS_TENSOR

_MAX_DEPTH = 8  # nested containers deeper than this are not followed
_CONTAINERS = (dict, list, tuple, set)
# Values that hold nothing to restore in place: skipped at once (most of a module's attributes).
_ATOMS = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size})
# What nn.Module.__init__ puts in every module's __dict__: its flag, its dicts of parameters,
# buffers and submodules, its set of non-persistent buffer names, and its hook dicts (almost
# always empty). The rest is the subclass's own.
_INTERNALS = frozenset(vars(nn.Module()))
_INTERNAL_CONTAINERS = tuple(sorted(k for k in _INTERNALS if k != "training"))
_INTERNAL_GETTER = itemgetter(*_INTERNAL_CONTAINERS)


@dataclass
class ModuleState:
    """What ``snapshot`` recorded; ``restore`` puts it back."""

    modules: list[nn.Module] = field(default_factory=list)
    classes: list[type] = field(default_factory=list)
    dicts: list[dict] = field(default_factory=list)  # every non-empty plain dict recorded ...
    # ... and what they held, as flat lists (so that ``restore`` compares them in one go): each
    # dict's length, then all their keys and all their values in order.
    sizes: list[int] = field(default_factory=list)
    keys: list[Any] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)
    # Other non-empty containers (lists, sets, OrderedDicts such as hook dicts) and their copies.
    others: list[tuple[Any, Any]] = field(default_factory=list)
    empty: list[Any] = field(default_factory=list)  # containers that were empty (most hook dicts)
    tensors: set[int] = field(default_factory=set)  # ids of tensors kept on modules besides their parameters
    # Parameters and buffers of lazy modules not yet materialized: (tensor, its class, its data).
    uninitialized: list[tuple[torch.Tensor, type, torch.Tensor]] = field(default_factory=list)
    # Filled by ``restore``: id -> the shape each of those took during the pass.
    materialized: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def restore(self) -> None:
        if any(map(is_not, map(type, self.modules), self.classes)):
            for module, cls in zip(self.modules, self.classes, strict=True):
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
        for container, copy in self.others:
            if _changed(container, copy):
                container.clear()
                if isinstance(container, list):
                    container.extend(copy)
                else:
                    container.update(copy)
        if _any_changed(self.dicts, self.sizes, self.keys, self.values):
            start = 0
            for d, size in zip(self.dicts, self.sizes, strict=True):
                keys, values = self.keys[start:start + size], self.values[start:start + size]
                start += size
                if _any_changed([d], [size], keys, values):
                    # Straight into __dict__: Module.__setattr__ would file tensors and modules anew.
                    d.clear()
                    d.update(zip(keys, values, strict=True))


def _changed(container: Any, copy: Any) -> bool:
    """Does a dict, list or set hold other objects than ``copy``? By identity, in C."""
    if len(container) != len(copy):
        return True
    if isinstance(container, dict):
        return container.keys() != copy.keys() or any(map(is_not, container.values(), copy.values()))
    if isinstance(container, list):
        return any(map(is_not, container, copy))
    return container != copy  # a set: same length, compare members


def _any_changed(dicts: list[dict], sizes: list[int], keys: list[Any], values: list[Any]) -> bool:
    """Do the plain dicts hold other keys or values, or in another order, than they held (``sizes``,
    ``keys``, ``values``: as ``snapshot`` flattened them)? Values by identity (an equal new tensor is
    still another object), keys by equality; all in C."""
    if list(map(len, dicts)) != sizes:
        return True
    try:
        if list(chain.from_iterable(dicts)) != keys:
            return True
    except Exception:  # a key whose comparison raises (a tensor): look at each dict
        return True
    return any(map(is_not, chain.from_iterable(map(dict.values, dicts)), values))


def snapshot(modules: Iterable[nn.Module]) -> ModuleState:
    """Record the state of every module in ``modules`` (repeats are fine)."""
    mods = list({id(m): m for m in modules}.values())
    state = ModuleState(mods, list(map(type, mods)))
    attrs = list(map(vars, mods))
    seen = set(map(id, attrs))
    state.dicts += attrs
    try:  # nn.Module's own containers, by name (a module not built by nn.Module.__init__ may lack one)
        internal = list(chain.from_iterable(map(_INTERNAL_GETTER, attrs)))
    except KeyError:
        internal = [d[k] for d in attrs for k in _INTERNAL_CONTAINERS if k in d]
    sharded = _fsdp2_managed(mods)
    if sharded:  # FSDP's parameter dicts are not ours to put back
        skip = {id(vars(m).get("_parameters")) for m in mods if id(m) in sharded}
        internal = [c for c in internal if id(c) not in skip]
    state.empty += filterfalse(None, internal)  # most hook dicts: only whether they stay empty matters
    # Their values (parameters, buffers, submodules, hooks) are not followed. Most are plain dicts
    # (``_parameters``, ``_modules``): recorded in bulk; the rest (hook OrderedDicts) one by one.
    filled = list(filter(None, internal))
    plain = [c for c in filled if type(c) is dict]
    state.dicts += plain
    seen.update(map(id, plain))
    if len(plain) < len(filled):
        for c in filled:
            if type(c) is not dict and isinstance(c, (dict, list, set)):
                seen.add(id(c))
                _keep(c, state)
    for d in attrs:
        for name in d.keys() - _INTERNALS:  # the subclass's own attributes (set difference, in C)
            value = d[name]
            t = type(value)
            if t not in _ATOMS and not (t is tuple and _ATOMS.issuperset(map(type, value))):
                _record(value, state, seen, 0)
    dicts = state.dicts
    state.sizes = list(map(len, dicts))
    state.keys = list(chain.from_iterable(dicts))
    state.values = list(chain.from_iterable(map(dict.values, dicts)))
    for m in mods:
        if isinstance(m, LazyModuleMixin):
            state.uninitialized += [(t, type(t), t.data) for t in (*m._parameters.values(), *m._buffers.values())
                                    if isinstance(t, UninitializedTensorMixin)]
    return state


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
    if IS_TENSOR[type(obj)]:
        state.tensors.add(id(obj))
        return
    if depth > _MAX_DEPTH or not isinstance(obj, _CONTAINERS) or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, set):
        _keep(obj, state)
        return  # its members are hashable: no containers to follow
    if isinstance(obj, tuple):
        values: Iterable[Any] = obj  # a tuple cannot change, but what it holds can
    else:
        _keep(obj, state)
        values = obj.values() if isinstance(obj, dict) else obj
    for v in values:
        if type(v) not in _ATOMS:
            _record(v, state, seen, depth + 1)


def _keep(container: dict | list | set, state: ModuleState) -> None:
    """Record a dict, list or set with a copy of what it holds: plain dicts for the bulk check of
    ``restore``, the others (a dict subclass in its own order: hooks registered with
    ``prepend=True`` run first) for a check of their own."""
    if type(container) is dict:
        state.dicts.append(container)  # its contents are flattened at the end of ``snapshot``
    elif isinstance(container, dict):
        state.others.append((container, OrderedDict(container)))
    elif isinstance(container, list):
        state.others.append((container, list(container)))
    else:
        state.others.append((container, set(container)))

"""Replay a whole torch function on the meta pass from what it dispatched the first time.

On meta (shapes.py) a forward pass costs PyTorch's machinery per op, not arithmetic. A
convolution called from Python crosses the dispatcher into the recorder's ``__torch_dispatch__``,
its arguments converted both ways; a batch norm runs its Python wrapper's checks, then crosses
twice (an empty tensor, then the norm). Intercepted one level up, under a ``TorchFunctionMode``,
the same call costs a fraction of that (``bench/analyze_stages.py``).

So for the functions in ``REPLAYABLE`` (convolutions, batch, layer and group norms, pointwise
activations, average pooling, elementwise arithmetic: the bulk of a network's calls), the first
call with a given signature runs as usual while the recorder notes the aten ops it dispatched:
for each, where its tensor arguments came from (an argument of the function, or a result of an
earlier op of the same call), which arguments it wrote into, and what the recorder kept of it. A
later call with the same signature appends the same nodes and returns a fresh meta tensor of the
remembered shape, without calling the function. The signature is everything the meta pass can
depend on: the shape, strides, dtype and device of each tensor, which tensors are one, the other
arguments, the grad and autocast modes and the default dtype (the shape cache's rule, one level up).

A call is remembered only where replaying it makes the graph the call would have made: every op
it ran allocated fresh outputs on meta or wrote in place into one tensor keeping its shape (a
view aliases its input: calls with views always run), it read no tensor but the function's
arguments and its own results, and the function returned one tensor it made or was given.
Calls with tensor subclasses or lists of tensors, under another torch-function mode, or after a
write through a view (while the recorder follows storages) run as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .ops import IS_TENSOR, SEQUENCES
from .shapes import MetaRunner, allocates_or_keeps_shape, empty_from_spec, tensor_spec

_T = torch.Tensor
REPLAYABLE = frozenset({
    torch.conv1d, torch.conv2d, torch.conv3d,
    F.batch_norm, F.layer_norm, F.group_norm,
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.leaky_relu,
    F.elu, torch.relu, torch.relu_, torch.sigmoid, torch.tanh,
    F.adaptive_avg_pool2d, F.avg_pool2d,
    torch.add, torch.mul, _T.add, _T.add_, _T.mul, _T.mul_, _T.sub, _T.mean, torch.mean,
})
_PLAIN = (torch.Tensor, nn.Parameter)  # exact types: a subclass may dispatch its own way
_CACHE_LIMIT = 8192  # distinct signatures; cleared when full
_NOT_REPLAYABLE = object()
# Autocast may cast a call's tensors (a model's own ``with torch.autocast(...)``): part of the signature.
_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled())


@dataclass(frozen=True, slots=True)
class _Step:
    """One aten op of a remembered call."""

    op: Any
    # Where each tensor argument comes from, in the order the recorder reads them: k >= 0 the
    # function's k-th tensor argument, -1 - j the result of step j.
    refs: tuple[int, ...]
    is_float: bool
    record: Any  # what the recorder kept of its arguments (``Graph.args``), or None
    writes: tuple[int, ...]  # the function's tensor arguments it wrote into


@dataclass(frozen=True, slots=True)
class _Template:
    steps: tuple[_Step, ...]
    out: int  # k >= 0: the function returned its k-th tensor argument; -1 - j: step j's result
    spec: tuple | None  # the shape, strides and dtype of a result it made
    written: tuple[int, ...]  # every argument some step writes into


class _Notes:
    """What the recorder tells while a call is being remembered (``_Recorder.notes``)."""

    def __init__(self, graph, tensors: list[torch.Tensor]):
        self.graph, self.start = graph, len(graph.ops)
        self.tensors = tensors
        self.position: dict[int, int] = {}
        for k, t in enumerate(tensors):
            self.position.setdefault(id(t), k)  # a tensor given twice is named by its first place
        self.made: dict[int, tuple[torch.Tensor, int]] = {}  # id -> (tensor, step that last bound it)
        self.steps: list[_Step] = []
        self.nodes: set[int] = set()
        self.exact = True

    def _ref(self, t: torch.Tensor) -> int | None:
        k = self.position.get(id(t))
        if k is not None and self.tensors[k] is t:
            return k
        e = self.made.get(id(t))
        return -1 - e[1] if e is not None and e[0] is t else None

    def op(self, func, n: int, args: tuple, kwargs: dict | None, out: Any, written: Any) -> None:
        """The recorder appended node ``n`` for ``func``, which returned ``out`` and wrote ``written``."""
        if not self.exact:
            return
        outs = [out] if IS_TENSOR[type(out)] else list(out) if type(out) in SEQUENCES else None
        if (len(self.graph.ops) != n + 1 or not outs or not allocates_or_keeps_shape(func)
                or not all(IS_TENSOR[type(o)] and o.is_meta for o in outs)):
            self.exact = False  # a split's pieces, a view, an op that ran on real tensors
            return
        refs = []
        for a in (*args, *kwargs.values()) if kwargs else args:
            found = [a] if IS_TENSOR[type(a)] else [b for b in a if IS_TENSOR[type(b)]] if type(a) in SEQUENCES else ()
            for t in found:
                ref = self._ref(t)
                # A tensor from elsewhere (a constant the call made, a global); or real integers,
                # whose values the recorder may keep (index_select's): not part of the signature.
                if ref is None or not (t.is_meta or t.is_floating_point()):
                    self.exact = False
                    return
                refs.append(ref)
        j, writes = len(self.steps), []
        for t in {id(t): t for t in (*outs, *written)}.values():  # what the recorder bound to node n
            k = self._ref(t)
            if k is not None and k >= 0:
                if t._is_view():
                    self.exact = False  # the recorder follows writes through views by storage
                    return
                writes.append(k)
            else:
                self.made[id(t)] = (t, j)
        self.steps.append(_Step(func, tuple(refs), self.graph.is_float[n], self.graph.args.get(n), tuple(writes)))
        self.nodes.add(n)

    def template(self, out: Any) -> _Template | None:
        g = self.graph
        if not self.exact or type(out) not in _PLAIN or any(
            i not in self.nodes and not isinstance(g.ops[i], str) for i in range(self.start, len(g.ops))
        ):
            return None  # some node is not a step or a leaf made for an argument
        ref = self._ref(out)
        if ref is None:
            return None
        written = tuple(sorted({k for s in self.steps for k in s.writes}))
        return _Template(tuple(self.steps), ref, tensor_spec(out) if ref < 0 else None, written)


class Replayer(TorchFunctionMode):
    """Replays the calls of ``REPLAYABLE`` functions into ``recorder``'s graph (see the module's doc)."""

    _cache: dict[tuple, Any] = {}  # shared by every trace: layer signatures recur across analyses

    def __init__(self, recorder, runner: MetaRunner):
        super().__init__()
        self.rec, self.runner = recorder, runner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in REPLAYABLE or self.rec.view_writes:
            return func(*args, **kwargs) if kwargs else func(*args)
        tensors: list[torch.Tensor] = []
        key = self._signature(func, args, kwargs, tensors)
        if key is None:
            return func(*args, **kwargs) if kwargs else func(*args)
        try:
            template = self._cache.get(key)
        except TypeError:  # an argument that does not hash
            return func(*args, **kwargs) if kwargs else func(*args)
        if template is None:
            return self._remember(key, func, args, kwargs or {}, tensors)
        if template is _NOT_REPLAYABLE or (template.written and any(tensors[k]._is_view() for k in template.written)):
            return func(*args, **kwargs) if kwargs else func(*args)
        return self._replay(template, tensors)

    def _signature(self, func, args: tuple, kwargs: dict | None, tensors: list[torch.Tensor]) -> tuple | None:
        """All a call on meta can depend on (see the module's doc), and its tensor arguments put in
        ``tensors``; None: not a call to replay."""
        spec_of, key, meta = self.runner.spec_of, [func], False
        for a in (*args, *kwargs.values()) if kwargs else args:
            t = type(a)
            if t in _PLAIN:
                tensors.append(a)
                on_meta = a.is_meta
                meta = meta or on_meta
                key.append((spec_of(a), on_meta))  # as the shape cache sees it, and where it lives
            elif t in SEQUENCES:
                if a and type(a[0]) is not int:
                    return None  # maybe a list of tensors
                key.append(tuple(a))
            elif IS_TENSOR[t]:
                return None  # a subclass: it may dispatch its own way
            else:
                key.append(a)
        if not meta:
            return None  # runs on real tensors: values may matter
        if kwargs:
            key.append(tuple(kwargs))
        if len(tensors) > 1 and len(set(map(id, tensors))) < len(tensors):
            # One tensor given twice (``x + x``): which arguments are one is part of the signature.
            key.append(tuple(next(j for j, u in enumerate(tensors) if u is t) for t in tensors))
        key.append(torch.is_grad_enabled())
        key.append(_autocast_enabled())
        key.append(torch.get_default_dtype())
        return tuple(key)

    def _remember(self, key: tuple, func, args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> Any:
        notes = self.rec.notes = _Notes(self.rec.g, tensors)
        try:
            out = func(*args, **kwargs)
        finally:
            self.rec.notes = None
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = notes.template(out) or _NOT_REPLAYABLE
        return out

    def _replay(self, template: _Template, tensors: list[torch.Tensor]) -> torch.Tensor:
        rec = self.rec
        g, node_of, call, nodes = rec.g, rec.node_of, rec.cur_call, []
        for step in template.steps:
            ins = [node_of(tensors[r]) if r >= 0 else nodes[-1 - r] for r in step.refs]
            n = len(g.ops)
            g.ops.append(step.op)
            g.ins.append(ins)
            g.call.append(call)
            g.is_float.append(step.is_float)
            if step.record is not None:
                g.args[n] = step.record
            for k in step.writes:
                rec.bind(tensors[k], n)
            nodes.append(n)
        if template.out >= 0:
            return tensors[template.out]
        out = _fresh(template.spec)
        rec.bind(out, nodes[-1 - template.out])
        return out


_PYTHON_KEY = torch._C.DispatchKey.Python
_SNAPSHOT_KEY = torch._C.DispatchKey.PythonTLSSnapshot
_excluded = torch._C._dispatch_tls_is_dispatch_key_excluded
_exclude = torch._C._dispatch_tls_set_dispatch_key_excluded


def _fresh(spec: tuple) -> torch.Tensor:
    """A new meta tensor, made without a round trip through the recorder's dispatch mode (still
    active here, one level up: it would take a factory call for an op of the model's, at several
    times the cost). Excluding the Python dispatch key is how PyTorch's own modes step aside; the
    TLS-snapshot key, which only serves the Python key, is excluded with it, as
    ``torch._C._DisableTorchDispatch`` does (a fifth of the call's time)."""
    was, was_snapshot = _excluded(_PYTHON_KEY), _excluded(_SNAPSHOT_KEY)
    _exclude(_PYTHON_KEY, True)
    _exclude(_SNAPSHOT_KEY, True)
    try:
        return empty_from_spec(spec)
    finally:
        _exclude(_PYTHON_KEY, was)
        _exclude(_SNAPSHOT_KEY, was_snapshot)


def replaying(recorder, runner: MetaRunner | None) -> Replayer | None:
    """The mode to run a meta pass under, or None where replaying could change what runs: on real
    tensors, and under another torch-function mode (``with torch.device(...)``), which the
    replayed calls would skip."""
    if runner is None or torch._C._len_torch_function_stack():
        return None
    return Replayer(recorder, runner)

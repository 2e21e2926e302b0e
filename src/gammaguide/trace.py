"""Record the dataflow of one forward pass.

Like ``torch.utils.flop_counter``, the model runs once, unmodified, under a
``TorchDispatchMode``: every aten op that reads a tensor becomes a node whose inputs
are the nodes that produced its tensor arguments (a factory's result, like any tensor
that no traced op produced, is a leaf: a constant). ``nn.Module._call_impl``, wrapped for the
duration of the pass (``_module_calls``), notes which module call each op ran in, so that later
stages can collapse a normalization module into a single node and name the module behind every
op. Nothing is attached to the model or to its tensors; the wrapper is taken off before
``trace`` returns, and the modules are left holding exactly what they held (``module_state.py``).
With ``on_meta`` the ops run on meta twins of their tensors (``shapes.py``): the
same graph, without the arithmetic; and a call whose aten ops an earlier call with the same
signature showed is replayed into the graph without running (``replay.py``).
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .module_state import snapshot
from .ops import (
    CONV_OPS, IS_TENSOR, NORM_OPS, PIECE, RECORDED_OPS, SEQUENCES, SPLIT_OPS, STACK_REDUCTIONS, SUM_OPS,
    UNMARKED_WRITES, base_name,
)
from .replay import replaying
from .shapes import META, MetaRunner

# Leaf kinds: tensors that no traced op produced.
INPUT, PARAM, BUFFER, CONST = "input", "param", "buffer", "const"
LEAF_KINDS = (INPUT, PARAM, BUFFER, CONST)


@dataclass(slots=True)  # one per module call: slots make them cheap to create
class Call:
    """One call of a module: the ops it ran are the nodes ``start <= i < end``."""

    module: torch.nn.Module
    name: str | None  # qualified name in the traced model, None for foreign modules
    parent: int
    start: int
    end: int = -1


@dataclass
class Graph:
    """The traced dataflow. Node ``i`` is an aten op (``ops[i]`` is the
    ``OpOverload``) or a leaf (``ops[i]`` is one of ``LEAF_KINDS``)."""

    ops: list[Any] = field(default_factory=list)
    ins: list[list[int] | tuple[int, ...]] = field(default_factory=list)
    call: list[int] = field(default_factory=list)  # innermost module call, -1 = top level
    is_float: list[bool] = field(default_factory=list)
    leaf_names: dict[int, str] = field(default_factory=dict)  # leaf node -> name
    param_nodes: dict[str, int] = field(default_factory=dict)  # parameter name -> leaf node
    calls: list[Call] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    # For observed sums (see ``trace(observe_adds=...)``): node -> f(each tensor argument), in the
    # order of ``ins[node]``.
    add_observations: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    # The arguments of the ops in ``RECORDED_OPS`` (channels.py needs them), tensors as ``Arg``s,
    # the shape of their result (a tuple of shapes for several results) and their keyword
    # arguments: node -> (args, shape, kwargs or None).
    # A split's pieces (nodes of op ``PIECE``) hold their index: node -> (index,).
    args: dict[int, tuple] = field(default_factory=dict)
    output_tensors: list[torch.Tensor] = field(default_factory=list)
    # Parameters of lazy modules that the pass materialized, made lazy again: id -> their shape.
    lazy_shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # Per-node facts that several stages derive from the finished graph (see norms.py).
    memo: dict[Callable, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ops)

    def derived(self, compute: Callable[["Graph"], Any]) -> Any:
        """``compute(self)``, computed once: a per-node fact several stages need."""
        value = self.memo.get(compute)
        if value is None:
            value = self.memo[compute] = compute(self)
        return value

    def op_names(self) -> list[str]:
        """Every node's op by its base name (``add_``; a leaf's kind), computed once."""
        return self.derived(_op_names)


def _op_names(graph: Graph) -> list[str]:
    by_id: dict[int, str] = {}  # ops hash in Python; their ids hash in C
    names = []
    for op in graph.ops:
        name = by_id.get(id(op))
        if name is None:
            name = by_id[id(op)] = base_name(op)
        names.append(name)
    return names


_UNKNOWN = (CONST, None)  # a tensor that is neither a parameter, a buffer nor an input
_UNWRITTEN = (-1, None)  # a storage no write went through a view into
_NO_INPUTS: tuple[int, ...] = ()  # shared by every leaf node: nothing appends to it
_INDEX_VALUES_LIMIT = 4096  # an index tensor's values are kept up to this many elements


class Arg(NamedTuple):
    """A tensor argument of a recorded op: its shape, and its values when it is a small integer
    tensor with real values (the indices of ``index_select``; on meta tensors they are unknown).
    A named tuple: one is made for every tensor argument of every recorded op."""

    shape: tuple[int, ...]
    values: tuple[int, ...] | None = None


TENSOR = Arg(())  # a tensor argument of a lightly recorded op, whose shape no reader needs


def _arg(a: Any) -> Any:
    if IS_TENSOR[type(a)]:
        if a.is_floating_point() or a.is_meta or a.is_complex() or a.numel() > _INDEX_VALUES_LIMIT:
            return Arg(a.shape)
        return Arg(a.shape, tuple(a.reshape(-1).tolist()))
    if type(a) in SEQUENCES and a and (IS_TENSOR[type(a[0])] or a[0] is None):
        return [_arg(b) for b in a]  # a tensor list (``cat``), or optional indices (``x[:, idx]``)
    return a


def _shape_of(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (list, tuple)):
        return tuple(tuple(o.shape) if isinstance(o, torch.Tensor) else None for o in out)
    return None


def _record(args: tuple, kwargs: dict | None, out: Any) -> tuple:
    return tuple(_arg(a) for a in args), _shape_of(out), {k: _arg(v) for k, v in kwargs.items()} if kwargs else None


def _record_light(args: tuple, kwargs: dict | None, out: Any) -> tuple:
    """For convolutions and fused norms, which run often: the shapes of their input and weight
    and their plain arguments (groups, normalized shape) are all channels.py reads; a later tensor
    is kept as ``TENSOR``, so that a norm's γ and β are told by position (its weight may be None)."""
    head = [Arg(a.shape) if IS_TENSOR[type(a)] else a for a in args[:2]]
    spec = (*head, *[TENSOR if IS_TENSOR[type(a)] else a for a in args[2:]])
    return spec, (tuple(out.shape) if IS_TENSOR[type(out)] else None), None


def _iter_tensors(obj: Any, _depth: int = 0):
    """Yield every tensor inside nested tuples, lists, dicts and dataclasses
    (Hugging Face ``ModelOutput`` is both a dict and a dataclass)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif _depth > 32:
        return
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _iter_tensors(v, _depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _iter_tensors(v, _depth + 1)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _iter_tensors(getattr(obj, name, None), _depth + 1)
    else:
        # Cache objects (HF DynamicCache) and other containers are not outputs we follow.
        return


@dataclass(frozen=True)
class _Writes:
    """The arguments an op writes into: ``positions`` and keyword ``names`` by its schema
    (``add_``'s self, ``out=``), ``unmarked`` positions that it writes without saying so
    when its argument at position ``unmarked_if`` is true (a batch norm in training)."""

    positions: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    unmarked: tuple[int, ...] = ()
    unmarked_if: int = -1

    @classmethod
    def of(cls, func) -> "_Writes":
        positions, names = [], []
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                if a.kwarg_only:
                    names.append(a.name)
                else:
                    positions.append(i)
        unmarked, flag = UNMARKED_WRITES.get(base_name(func), ((), -1))
        return cls(tuple(positions), tuple(names), unmarked, flag)

    def __bool__(self) -> bool:
        return bool(self.positions or self.names or self.unmarked)

    def marked(self, args: tuple, kwargs: dict | None) -> list[torch.Tensor]:
        out = [args[i] for i in self.positions if i < len(args) and isinstance(args[i], torch.Tensor)]
        if kwargs and self.names:
            out += [kwargs[k] for k in self.names if isinstance(kwargs.get(k), torch.Tensor)]
        return out

    def hidden(self, args: tuple) -> list[torch.Tensor]:
        if not (0 <= self.unmarked_if < len(args) and args[self.unmarked_if] is True):
            return []
        return [args[i] for i in self.unmarked if i < len(args) and isinstance(args[i], torch.Tensor)]


_NO_WRITES = _Writes()

# What the recorder does for an op besides appending its node: nothing, keep its arguments (some of
# them), or keep them and give each result its own node (a split's pieces).
_PLAIN, _KEEP_ARGS, _KEEP_SOME, _PIECES = 0, 1, 2, 3


def _recording(func) -> int:
    name = base_name(func)
    if name in SPLIT_OPS:
        return _PIECES
    if name in CONV_OPS or name in NORM_OPS:
        return _KEEP_SOME
    return _KEEP_ARGS if name in RECORDED_OPS else _PLAIN


def _observed(func) -> bool:
    """Ops whose tensor arguments ``observe_adds`` sees: every op that may be part of a sum."""
    name = base_name(func)
    return name in SUM_OPS or name == "stack" or name in STACK_REDUCTIONS


@lru_cache(maxsize=None)
def makes_constants(func) -> bool:
    """A factory (``empty``, ``zeros``, ``arange``): no tensor among its arguments. Its results are
    constants, never nodes of the graph (see ``_Recorder.__torch_dispatch__``)."""
    return not any("Tensor" in str(a.type) for a in func._schema.arguments)


# id(op) -> (op, its writes, what to record, observed, a factory): the same for every trace in the process.
_OP_INFO: dict[int, tuple[Any, _Writes, int, bool, bool]] = {}


class _Recorder(TorchDispatchMode):
    """Appends one node per aten op to ``graph``; kept lean because it runs per op."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # PyTorch wraps a mode's __torch_dispatch__ in a Dynamo-disabling shim that costs a few
        # microseconds per op. The traced model runs eagerly (compiled models are unwrapped
        # first), so there is nothing for Dynamo to compile into: skip the shim.
        return False

    def __init__(self, graph: Graph, known: dict[int, tuple[str, str]], observe_adds: Callable | None,
                 runner: MetaRunner | None = None, state_tensors: set[int] | frozenset = frozenset()):
        super().__init__()
        self.state_tensors = state_tensors  # ids of tensors kept on modules (module_state.py)
        self.g = graph
        self.runner = runner  # runs the ops that see a meta tensor on meta twins of all their tensors
        self.known = known  # id(tensor) -> (leaf kind, name) for params, buffers, inputs
        self.live: dict[int, tuple[weakref.ref, int]] = {}
        self.cur_call = -1
        self.observe_adds = observe_adds
        # storage -> (last node that wrote into it through a view, the storage). Holding the storage
        # keeps its address from going to a new tensor's storage while the trace runs, which would
        # then seem written too (free on meta; on the real pass such storages, masks and caches
        # written a slice at a time, live until the trace ends).
        self.view_writes: dict[int, tuple[int, Any]] = {}
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (param/buffer, value before)
        self.shared: dict[str, int] = {}  # the one leaf node of all buffers, of all constants
        self.notes = None  # while replay.py remembers a call: told every op appended

    # -- tensor -> node ---------------------------------------------------------------------------
    def node_of(self, t: torch.Tensor) -> int:
        e = self.live.get(id(t))
        if e is not None and e[0]() is t:
            n = e[1]
        else:
            n = self._new_leaf(t)
        if self.view_writes:
            w = self.view_writes.get(t.untyped_storage()._cdata, _UNWRITTEN)[0]
            if w > n:
                # Another view of this storage was written after ``t`` was produced:
                # reading ``t`` now also reads that write.
                return w
        return n

    def _new_leaf(self, t: torch.Tensor) -> int:
        kind, name = self.known.get(id(t), _UNKNOWN)
        if kind is BUFFER or kind is CONST:
            # Nothing downstream tells one buffer or constant from another (they are neither
            # activations nor parameters): one node per kind keeps the graph small, and the
            # tensor need not be bound to it (its next use comes back here, to the same node).
            n = self.shared.get(kind, -1)
            if n < 0:
                n = self.shared[kind] = self._append_leaf(t, kind)
            return n
        n = self._append_leaf(t, kind)  # a parameter or an input: a node of its own
        if name is not None:
            self.g.leaf_names[n] = name
            if kind is PARAM:
                self.g.param_nodes.setdefault(name, n)
        self.bind(t, n)
        return n

    def _append_leaf(self, t: torch.Tensor, kind: str) -> int:
        g = self.g
        n = len(g.ops)
        g.ops.append(kind)
        g.ins.append(_NO_INPUTS)
        g.call.append(self.cur_call)
        g.is_float.append(t.is_floating_point())
        return n

    def bind(self, t: torch.Tensor, n: int) -> None:
        self.live[id(t)] = (weakref.ref(t), n)

    # -- dispatch ---------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # This runs for every op of the forward pass: the common paths are inlined.
        info = _OP_INFO.get(id(func))  # ops are long-lived singletons; their ids hash fast
        if info is None or info[0] is not func:  # (the op held in it keeps its id from being reused)
            info = _OP_INFO[id(func)] = (func, _Writes.of(func) or _NO_WRITES, _recording(func), _observed(func),
                                         makes_constants(func))
        _, writes, recording, observed, factory = info
        if factory:
            # A tensor made from no tensor is a constant to every later stage: where it is read, it
            # becomes the one constant leaf, as any tensor no op produced (BatchNorm makes an
            # empty one per call in eval mode: a sixth of MobileNetV3's ops). On meta, the shape
            # cache makes it (a fifth of the cost of calling the op).
            if kwargs and self.runner is not None and kwargs.get("device") == META:
                return self.runner(func, args, kwargs)
            return func(*args, **kwargs) if kwargs else func(*args)
        live, node_of, plain = self.live, self.node_of, not self.view_writes
        # While no write went through a view, ``node_of`` is the live node, else a new leaf.
        miss = self._new_leaf if plain else node_of
        ins = []
        on_meta = False  # some argument is a meta tensor: the op runs on shapes alone
        for a in ((*args, *kwargs.values()) if kwargs else args):
            if IS_TENSOR[type(a)]:
                e = live.get(id(a))
                ins.append(e[1] if plain and e is not None and e[0]() is a else miss(a))
                on_meta = on_meta or a.is_meta
            elif type(a) in SEQUENCES and a and type(a[0]) is not int:  # not sizes: maybe tensors
                for b in a:
                    if IS_TENSOR[type(b)]:
                        ins.append(node_of(b))
                        on_meta = on_meta or b.is_meta
        runner = self.runner if on_meta else None
        g = self.g
        n = len(g.ops)
        if observed and self.observe_adds is not None:
            # Measured before the op runs: an in-place add overwrites its first argument.
            g.add_observations[n] = tuple(self.observe_adds(t) for t in _iter_tensors((args, kwargs or {})))
        written = ()
        if writes is not _NO_WRITES:
            written = writes.marked(args, kwargs)
            hidden = writes.hidden(args) if writes.unmarked else ()
            if (written or hidden) and runner is None:  # on meta, only twins are written
                self._save_before_write(written, hidden)

        if runner is not None:
            out = runner(func, args, kwargs)
        else:
            out = func(*args, **kwargs) if kwargs else func(*args)

        g.ops.append(func)
        g.ins.append(ins)
        g.call.append(self.cur_call)
        if isinstance(out, torch.Tensor):
            g.is_float.append(out.is_floating_point())
            live[id(out)] = (weakref.ref(out), n)
        else:
            first_float = False
            if isinstance(out, (list, tuple)):
                for i, o in enumerate(out):
                    if isinstance(o, torch.Tensor):
                        if i == 0:
                            first_float = o.is_floating_point()
                        live[id(o)] = (weakref.ref(o), n)
            g.is_float.append(first_float)
        if recording:
            g.args[n] = (_record_light if recording == _KEEP_SOME else _record)(args, kwargs, out)
            if recording == _PIECES and isinstance(out, (list, tuple)):
                self._pieces(n, out)

        for t in written:
            if t is not out:  # an in-place op returns what it wrote into: bound above
                self.bind(t, n)
            if t._is_view():
                storage = t.untyped_storage()
                self.view_writes[storage._cdata] = (n, storage)
        if self.notes is not None:
            self.notes.op(func, n, args, kwargs, out, written)
        return out

    def _pieces(self, n: int, out: list | tuple) -> None:
        """One node per piece of a split, so that each piece is followed on its own."""
        g = self.g
        for i, o in enumerate(out):
            if isinstance(o, torch.Tensor):
                p = len(g.ops)
                g.ops.append(PIECE)
                g.ins.append((n,))
                g.call.append(self.cur_call)
                g.is_float.append(o.is_floating_point())
                g.args[p] = (i,)
                self.live[id(o)] = (weakref.ref(o), p)

    def _save_before_write(self, *written: list[torch.Tensor]) -> None:
        """Keep the value of a parameter or buffer the forward pass is about to overwrite (a BN
        that updates its running statistics even in eval mode, a call counter), so that
        ``trace`` can put it back: analyzing a model must not change it."""
        for tensors in written:
            for t in tensors:
                base = t._base if t._is_view() else t
                key = id(base)
                if key not in self.saved and (self.known.get(key, (CONST,))[0] in (PARAM, BUFFER)
                                              or key in self.state_tensors or id(t) in self.state_tensors):
                    self.saved[key] = (base, base.detach().clone())

    def restore(self) -> None:
        with torch.no_grad():
            for t, value in self.saved.values():
                t.copy_(value)
        self.saved.clear()


@contextlib.contextmanager
def _module_calls(rec: _Recorder):
    """Note in ``rec``'s graph where each module call begins and ends (also when it raises), and
    which call ``rec`` is in (``cur_call``, for every node it appends). Global module hooks
    would do it too, but they send every module call down ``nn.Module._call_impl``'s slow path
    (a tenth of MobileNetV3-Small's analysis). Instead ``_call_impl``, which ``Module.__call__``
    looks up on every call, is wrapped for the duration of the pass, as torch.fx wraps
    ``__call__``: a plain class attribute, so setting it costs nothing (setting ``__call__``
    updates the slot of every subclass). The module's own hooks run inside the call."""
    call_impl = nn.Module._call_impl
    ops, calls = rec.g.ops, rec.g.calls

    def recorded(module, *args, **kwargs):
        parent = rec.cur_call
        call = Call(module, None, parent, len(ops))
        calls.append(call)
        rec.cur_call = len(calls) - 1
        try:
            return call_impl(module, *args, **kwargs)
        finally:
            call.end = len(ops)
            rec.cur_call = parent

    nn.Module._call_impl = recorded
    try:
        yield
    finally:
        nn.Module._call_impl = call_impl


@contextlib.contextmanager
def gc_paused():
    """The cyclic garbage collector off for the duration of one analysis. Tracing makes thousands
    of short-lived lists and tuples, all freed by reference counting, that would otherwise trigger
    collections scanning the whole heap (the model and every library it imported)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _no_fused_fast_paths():
    """``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` run a whole block as one fused
    op in eval mode without gradients, which hides its norms and residual additions from
    the trace: switch that fast path off while tracing."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    enabled = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(enabled)


def _model_names(
    model: torch.nn.Module, every: list[tuple[str, torch.nn.Module]] | None = None
) -> tuple[dict[int, tuple[str, str]], dict[int, str]]:
    """One walk over the modules (it runs on every analysis): id -> (kind, qualified name) for
    every parameter and buffer, and id -> qualified name for every module. A tensor or module
    registered under several names keeps the first, as ``named_parameters()`` reports it.
    ``every``: ``model.named_modules(remove_duplicate=False)``, when the caller has walked it."""
    known: dict[int, tuple[str, str]] = {}
    modules: dict[int, str] = {}
    for prefix, m in every if every is not None else model.named_modules(remove_duplicate=False):
        modules.setdefault(id(m), prefix)
        dot = f"{prefix}." if prefix else ""
        for attr, p in m._parameters.items():
            if p is not None:
                known.setdefault(id(p), (PARAM, dot + attr))
        for attr, b in m._buffers.items():
            if b is not None:
                known.setdefault(id(b), (BUFFER, dot + attr))
    return known, modules


def trace(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    *,
    observe_adds: Callable[[torch.Tensor], Any] | None = None,
    modules: list[tuple[str, torch.nn.Module]] | None = None,
    on_meta: bool = False,
) -> Graph:
    """Run ``model(*args, **kwargs)`` once and return its dataflow graph.

    ``observe_adds(tensor)`` is applied to every tensor argument of every op that may be part of a
    sum (additions, subtractions, ``addcmul``, ``stack`` and the reductions that sum a stack) before
    it runs.
    ``modules``: ``model.named_modules(remove_duplicate=False)``, when the caller has walked it.
    ``on_meta``: run on shapes alone (see ``shapes.py``): the inputs are given as meta twins.
    The caller decides the model's mode and grad state; exceptions from the forward pass
    propagate unchanged. Afterwards, also when it raises, every module holds exactly what it
    held before (``module_state.py``: attributes set, added or filled during the pass) and
    every parameter, buffer or tensor attribute written in place (running statistics,
    counters, caches) holds its old value.
    """
    graph = Graph()
    runner = None
    if on_meta:
        runner = MetaRunner()
        args, kwargs = runner.to_meta(args), runner.to_meta(kwargs)
    known, names = _model_names(model, modules)
    for i, t in enumerate(_iter_tensors(args)):
        known.setdefault(id(t), (INPUT, f"args[{i}]"))
    for key, value in kwargs.items():
        for t in _iter_tensors(value):
            known.setdefault(id(t), (INPUT, key))

    state = snapshot(m for _, m in (modules if modules is not None else model.named_modules()))
    rec = _Recorder(graph, known, observe_adds, runner, state.tensors)
    replayer = replaying(rec, runner) if observe_adds is None else None
    try:
        with rec, _module_calls(rec), _no_fused_fast_paths(), replayer or contextlib.nullcontext():
            out = model(*args, **kwargs)
            graph.output_tensors = list(_iter_tensors(out))
            graph.outputs = [rec.node_of(t) for t in graph.output_tensors]
    finally:
        rec.restore()
        state.restore()
        graph.lazy_shapes = state.materialized
    for call in graph.calls:
        call.name = names.get(id(call.module))  # (``_module_calls`` closed every call, also one that raised)
    return graph

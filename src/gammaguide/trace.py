"""Record the dataflow of one forward pass.

Like ``torch.utils.flop_counter``, the model runs once, unmodified, under a
``TorchDispatchMode``: every aten op becomes a node whose inputs are the nodes
that produced its tensor arguments. Two global module hooks note which module
call each op ran in, so that later stages can collapse a normalization module
into a single node and name the module behind every op. Nothing is attached
to the model or to its tensors; the hooks are removed before ``trace`` returns.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.nn.modules import module as _module_hooks
from torch.utils._python_dispatch import TorchDispatchMode

# Leaf kinds: tensors that no traced op produced.
INPUT, PARAM, BUFFER, CONST = "input", "param", "buffer", "const"
LEAF_KINDS = (INPUT, PARAM, BUFFER, CONST)


@dataclass
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
    ins: list[list[int]] = field(default_factory=list)
    call: list[int] = field(default_factory=list)  # innermost module call, -1 = top level
    is_float: list[bool] = field(default_factory=list)
    leaf_names: dict[int, str] = field(default_factory=dict)  # leaf node -> name
    param_nodes: dict[str, int] = field(default_factory=dict)  # parameter name -> leaf node
    calls: list[Call] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    # For observed adds (see ``trace(observe_adds=...)``): node -> (f(arg0), f(arg1)).
    add_observations: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    output_tensors: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ops)


_ADD_OPS = frozenset({torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor, torch.ops.aten.add.out})


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


class _Recorder(TorchDispatchMode):
    """Appends one node per aten op to ``graph``; kept lean because it runs per op."""

    def __init__(self, graph: Graph, known: dict[int, tuple[str, str]], observe_adds: Callable | None):
        super().__init__()
        self.g = graph
        self.known = known  # id(tensor) -> (leaf kind, name) for params, buffers, inputs
        self.live: dict[int, tuple[weakref.ref, int]] = {}
        self.cur_call = -1
        self.observe_adds = observe_adds
        self.view_writes: dict[int, int] = {}  # storage -> last node that wrote into it through a view
        self._mutated_args: dict[Any, tuple[int, ...]] = {}

    # -- tensor -> node ---------------------------------------------------------------------------
    def node_of(self, t: torch.Tensor) -> int:
        e = self.live.get(id(t))
        if e is not None and e[0]() is t:
            n = e[1]
        else:
            n = self._new_leaf(t)
        if self.view_writes:
            w = self.view_writes.get(t.untyped_storage()._cdata)
            if w is not None and w > n:
                # Another view of this storage was written after ``t`` was produced:
                # reading ``t`` now also reads that write.
                return w
        return n

    def _new_leaf(self, t: torch.Tensor) -> int:
        g = self.g
        kind, name = self.known.get(id(t), (CONST, None))
        n = len(g.ops)
        g.ops.append(kind)
        g.ins.append([])
        g.call.append(self.cur_call)
        g.is_float.append(t.is_floating_point())
        if name is not None:
            g.leaf_names[n] = name
            if kind == PARAM:
                g.param_nodes.setdefault(name, n)
        self.bind(t, n)
        return n

    def bind(self, t: torch.Tensor, n: int) -> None:
        self.live[id(t)] = (weakref.ref(t), n)

    # -- dispatch ---------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        node_of = self.node_of
        ins = []
        for a in args:
            if isinstance(a, torch.Tensor):
                ins.append(node_of(a))
            elif isinstance(a, (list, tuple)):
                for b in a:
                    if isinstance(b, torch.Tensor):
                        ins.append(node_of(b))
        if kwargs:
            for a in kwargs.values():
                if isinstance(a, torch.Tensor):
                    ins.append(node_of(a))
                elif isinstance(a, (list, tuple)):
                    for b in a:
                        if isinstance(b, torch.Tensor):
                            ins.append(node_of(b))
        g = self.g
        n = len(g.ops)
        if self.observe_adds is not None and func in _ADD_OPS and len(ins) == 2:
            # Measured before the op runs: an in-place add overwrites its first argument.
            g.add_observations[n] = (self.observe_adds(args[0]), self.observe_adds(args[1]))

        out = func(*args, **kwargs) if kwargs else func(*args)

        g.ops.append(func)
        g.ins.append(ins)
        g.call.append(self.cur_call)
        if isinstance(out, torch.Tensor):
            g.is_float.append(out.is_floating_point())
            self.bind(out, n)
        else:
            first_float = False
            if isinstance(out, (list, tuple)):
                for i, o in enumerate(out):
                    if isinstance(o, torch.Tensor):
                        if i == 0:
                            first_float = o.is_floating_point()
                        self.bind(o, n)
            g.is_float.append(first_float)

        mutated = self._mutated_args.get(func)
        if mutated is None:
            mutated = self._mutated_args[func] = tuple(
                i for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write
            )
        for i in mutated:
            t = args[i] if i < len(args) else None
            if isinstance(t, torch.Tensor):
                self.bind(t, n)
                if t._is_view():
                    self.view_writes[t.untyped_storage()._cdata] = n
        return out

    # -- module hooks -----------------------------------------------------------------------------
    def enter(self, module, args):
        g = self.g
        g.calls.append(Call(module, None, self.cur_call, len(g.ops)))
        self.cur_call = len(g.calls) - 1

    def leave(self, module, args, output):
        c = self.cur_call
        if c >= 0:
            call = self.g.calls[c]
            call.end = len(self.g.ops)
            self.cur_call = call.parent


def trace(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    *,
    observe_adds: Callable[[torch.Tensor], Any] | None = None,
) -> Graph:
    """Run ``model(*args, **kwargs)`` once and return its dataflow graph.

    ``observe_adds(tensor)`` is applied to both tensor arguments of every add before it runs.
    The caller decides the model's mode and grad state; exceptions from the forward pass
    propagate unchanged.
    """
    graph = Graph()
    known: dict[int, tuple[str, str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        known.setdefault(id(p), (PARAM, name))
    for name, b in model.named_buffers(remove_duplicate=False):
        known.setdefault(id(b), (BUFFER, name))
    for i, t in enumerate(_iter_tensors(args)):
        known.setdefault(id(t), (INPUT, f"args[{i}]"))
    for key, value in kwargs.items():
        for t in _iter_tensors(value):
            known.setdefault(id(t), (INPUT, key))
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}

    rec = _Recorder(graph, known, observe_adds)
    pre = _module_hooks.register_module_forward_pre_hook(rec.enter)
    post = _module_hooks.register_module_forward_hook(rec.leave, always_call=True)
    try:
        with rec:
            out = model(*args, **kwargs)
            graph.output_tensors = list(_iter_tensors(out))
            graph.outputs = [rec.node_of(t) for t in graph.output_tensors]
    finally:
        pre.remove()
        post.remove()
    for call in graph.calls:
        call.name = names.get(id(call.module))
        if call.end < 0:  # a call that raised; close it so ranges stay valid
            call.end = len(graph.ops)
    return graph

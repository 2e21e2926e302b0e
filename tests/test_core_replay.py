"""Replayed calls (replay.py): the graph a replay makes is the graph the call makes, over a zoo
of architectures and over the cases the exactness rules are for; and the recorder's writes
through views (trace.py) are told apart from a new tensor's that took a freed storage's place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gammaguide import specs
from gammaguide import trace as tracing
from gammaguide.replay import Replayer
from gammaguide.shapes import MetaRunner
from gammaguide.trace import PARAM, trace

ZOO = [
    "resnet20", "preact_resnet18", "torchvision:mobilenet_v3_small", "torchvision:shufflenet_v2_x1_0",
    "torchvision:densenet121", "torchvision:swin_t", "torchvision:convnext_tiny", "torchvision:efficientnet_b0",
    "timm:levit_128s", "timm:dpn68", "hf:bert", "hf:llama",
]


def graph_of(model: nn.Module, args: tuple, kwargs: dict, *, replay: bool, monkeypatch) -> tracing.Graph:
    with monkeypatch.context() as m:
        if not replay:
            m.setattr(tracing, "replaying", lambda *a: None)
        with torch.no_grad():
            return trace(model, args, kwargs, on_meta=True)


def facts(g: tracing.Graph) -> tuple:
    """Everything a later stage reads of a graph, node numbers included."""
    return (
        g.ops, [list(i) for i in g.ins], g.call, g.is_float, g.leaf_names, g.param_nodes, g.outputs, g.args,
        [(c.module, c.name, c.parent, c.start, c.end) for c in g.calls],
    )


@pytest.fixture
def replays(monkeypatch):
    """Counts the calls replayed."""
    count = [0]
    replay = Replayer._replay

    def counted(self, *a):
        count[0] += 1
        return replay(self, *a)

    monkeypatch.setattr(Replayer, "_replay", counted)
    return count


def _inputs(loaded) -> tuple[tuple, dict]:
    x = loaded.example_inputs
    return ((), x) if isinstance(x, dict) else ((x,), {})


@pytest.mark.parametrize("spec", ZOO)
def test_a_replayed_pass_makes_the_graph_the_calls_make(spec, replays, monkeypatch):
    shape = (1, 3, 64, 64) if spec.startswith("torchvision:") else None
    loaded = specs.load(spec, input_shape=shape)
    args, kwargs = _inputs(loaded)
    loaded.model.eval()  # as analyze traces it
    Replayer._cache.clear()
    expected = facts(graph_of(loaded.model, args, kwargs, replay=False, monkeypatch=monkeypatch))
    first = facts(graph_of(loaded.model, args, kwargs, replay=True, monkeypatch=monkeypatch))  # remembers
    cached_first = replays[0]
    again = facts(graph_of(loaded.model, args, kwargs, replay=True, monkeypatch=monkeypatch))
    assert first == expected
    assert again == expected
    assert replays[0] > cached_first  # the second pass did replay calls


class Awkward(nn.Module):
    """Calls of replayable functions in the shapes the exactness rules are for."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.scale = nn.Parameter(torch.ones(4, 1, 1))

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)), inplace=True)  # an in-place call: its argument is rebound
        h = F.relu(h, inplace=True)  # twice the same in-place signature
        s = F.relu(self.scale)  # real tensors alone: runs for real
        a = torch.add(h, h)  # one tensor twice
        b = torch.add(h, x)  # two tensors of the same signature as ``a``'s
        c = h.add_(x)  # writes into its first argument and returns it
        d = torch.mul(a, 2.0) + torch.mul(b, 3.0)  # the scalar is part of the signature
        e = F.batch_norm(d, None, None, training=True)  # batch statistics: no running buffers
        f = self.bn(e) * s + c
        F.relu(f[:, :2], inplace=True)  # a write through a view: never replayed, nor anything after it
        return F.relu(f)


def test_awkward_calls_replay_to_the_graph_they_make(replays, monkeypatch):
    model, x = Awkward().eval(), torch.randn(2, 4, 6, 6)
    Replayer._cache.clear()
    expected = facts(graph_of(model, (x,), {}, replay=False, monkeypatch=monkeypatch))
    assert facts(graph_of(model, (x,), {}, replay=True, monkeypatch=monkeypatch)) == expected
    replays[0] = 0
    assert facts(graph_of(model, (x,), {}, replay=True, monkeypatch=monkeypatch)) == expected
    # Of the second pass's 17 calls, all but the call on real tensors, the write through a view and
    # the call after it (the recorder now follows that storage).
    assert replays[0] == 14


def test_a_call_that_may_not_be_replayed_has_no_signature():
    def signature(func, args, kwargs=None):
        return Replayer(None, MetaRunner())._signature(func, args, kwargs, [])

    x, w = torch.empty(1, 3, 4, 4, device="meta"), torch.randn(4, 3, 1, 1)
    assert signature(torch.conv2d, (x, w)) is not None
    assert signature(torch.conv2d, (x.as_subclass(Subclass), w)) is None  # may dispatch its own way
    assert signature(torch.conv2d, (torch.randn(1, 3, 4, 4), w)) is None  # real: values may matter
    assert signature(torch.cat, ([x, x],)) is None  # a list of tensors
    assert signature(torch.add, (x, x), {"alpha": 2}) != signature(torch.add, (x, x), {"alpha": 3})
    y = torch.empty(1, 3, 4, 4, device="meta")
    assert signature(torch.add, (x, x)) != signature(torch.add, (x, y))  # one tensor twice, or two


def test_the_signature_holds_the_grad_and_autocast_modes_and_the_default_dtype(monkeypatch):
    model, x = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval(), torch.randn(1, 3, 4, 4)
    Replayer._cache.clear()
    graph_of(model, (x,), {}, replay=True, monkeypatch=monkeypatch)
    calls = len(Replayer._cache)
    assert calls == 2  # conv, batch norm
    with torch.enable_grad():
        trace(model, (x,), {}, on_meta=True)
    assert len(Replayer._cache) == 2 * calls  # the same calls with grad: new signatures
    dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        graph_of(model, (x,), {}, replay=True, monkeypatch=monkeypatch)
    finally:
        torch.set_default_dtype(dtype)
    assert len(Replayer._cache) == 3 * calls
    replayer, meta = Replayer(None, MetaRunner()), torch.empty(2, device="meta")
    plain = replayer._signature(torch.relu, (meta,), None, [])
    with torch.autocast("cpu"):  # a model's own autocast region
        assert replayer._signature(torch.relu, (meta,), None, []) != plain


def test_nothing_is_replayed_under_another_torch_function_mode_or_on_the_real_pass(replays, monkeypatch):
    model, x = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()).eval(), torch.randn(1, 3, 4, 4)
    Replayer._cache.clear()
    graph_of(model, (x,), {}, replay=True, monkeypatch=monkeypatch)
    graph_of(model, (x,), {}, replay=True, monkeypatch=monkeypatch)
    replayed = replays[0]
    assert replayed == 3  # the second pass: conv, batch norm, relu
    with torch.device("cpu"):  # a torch-function mode of the user's, below ours
        graph_of(model, (x,), {}, replay=True, monkeypatch=monkeypatch)
    with torch.no_grad():
        trace(model, (x,), {})  # the real pass
    assert replays[0] == replayed


class Subclass(torch.Tensor):
    pass


def test_a_replayed_call_binds_its_result_and_runs_nothing(monkeypatch):
    model, x = nn.Conv2d(3, 4, 3), torch.randn(1, 3, 5, 5)
    graph_of(model, (x,), {}, replay=True, monkeypatch=monkeypatch)  # remembered
    ran = []
    run = MetaRunner.__call__
    monkeypatch.setattr(MetaRunner, "__call__", lambda self, *a: ran.append(a[0]) or run(self, *a))
    g = graph_of(model, (x,), {}, replay=True, monkeypatch=monkeypatch)
    assert [str(op) for op in g.ops] == ["input", "param", "param", "aten.convolution.default"]
    assert g.ins[3] == [0, 1, 2] and g.outputs == [3]
    assert ran == []  # not even the shape cache: the call was replayed whole
    assert {g.ops[n] for n in g.param_nodes.values()} == {PARAM}


class FreesWrittenStorages(nn.Module):
    """Writes through a view into a scratch constant that dies at once, then makes a new constant of
    the same size (whose storage may take the freed one's place) and reads it."""

    def forward(self, x):
        out = x
        for _ in range(8):
            scratch = torch.zeros(16, device=x.device)
            scratch[:4] = 1.0  # a write through a view
            del scratch
            fresh = torch.zeros(16, device=x.device)  # written by nothing
            out = out + fresh.sum()
        return out


@pytest.mark.parametrize("on_meta", [True, False])
def test_a_storage_written_through_a_view_is_not_confused_with_a_later_one(on_meta):
    """On meta, the freed storage's place goes to the next one at once: the recorder read each
    ``fresh`` as the scratch's last write until it held on to the storages written through views."""
    model, x = FreesWrittenStorages(), torch.randn(2, 16)
    with torch.no_grad():
        g = trace(model, (x,), {}, on_meta=on_meta)
    names = [str(op) for op in g.ops]
    sums = [n for n, name in enumerate(names) if name == "aten.sum.default"]
    assert len(sums) == 8
    for n in sums:  # each reads a constant no write reached
        assert [names[i] for i in g.ins[n]] == ["const"]

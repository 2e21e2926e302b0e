"""analyze, param_groups, zero_init and verify leave every module holding exactly what it held:
the same objects, devices and values, also for what forward caches on a module (issue 9, §1)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gammaguide as gg

# Every test twice: analyze's default pass on meta tensors, and the real pass (conftest.py).
pytestmark = pytest.mark.usefixtures("forward_pass")

X = torch.randn(2, 3, 8, 8)


class Lazy(nn.Module):
    """The issue's example: an attribute set from None on first use."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.table = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), None

    def forward(self, x):
        if self.table is None:
            self.table = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device)
        return self.bn(self.conv(x)) + 0 * self.table


class Caches(nn.Module):
    """A residual block with every kind of cache forward may keep: a new attribute, a dict filled per
    size, a list rebuilt on the input's device (torchvision's anchor generator), a nested container,
    a buffer registered on first use with a length counter (rotary embeddings), and a plain tensor
    attribute written in place."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.by_size: dict[int, torch.Tensor] = {}
        self.anchors = [torch.zeros(4), torch.ones(4)]
        self.nested = {"masks": [], "meta": (torch.zeros(1), {})}
        self.seq_cached = 0
        self.calls = torch.zeros(2)  # more than one value: never tested for truth

    def forward(self, x):
        n = x.shape[-1]
        if n not in self.by_size:
            self.by_size[n] = torch.linspace(0, 1, n, device=x.device)
        self.anchors = [a.to(device=x.device, dtype=x.dtype) for a in self.anchors]
        self.nested["masks"].append(torch.ones(n, n, device=x.device))
        self.nested["meta"][1]["last"] = x.new_zeros(1)
        if n > self.seq_cached:
            self.register_buffer("cos", torch.cos(torch.arange(n, device=x.device)), persistent=False)
            self.seq_cached = n
        self.calls.add_(1)
        self.first_use = True  # an attribute forward creates
        h = self.bn1(self.conv1(x))
        bias = (self.by_size[n] + self.cos[:n]).view(1, 1, 1, n) * 0 + self.anchors[0].view(1, 4, 1, 1) * 0
        return h + self.bn2(self.conv2(torch.relu(h))) + bias


class NeedsValues(Caches):
    """Caches on the input's device, then needs a value: the meta pass fails after filling the
    caches, and the real pass that follows must start from clean ones."""

    def forward(self, x):
        out = super().forward(x)
        if float(self.by_size[x.shape[-1]].sum()) < 0:  # .item() on a meta tensor raises
            out = -out
        return out


def fingerprint(obj, depth=0):
    """Everything a module holds, by identity, with tensors' devices and values."""
    if isinstance(obj, nn.Module):
        return ("module", id(obj), type(obj), {k: fingerprint(v, depth + 1) for k, v in vars(obj).items()
                                               if k not in ("_modules",)},
                {k: id(v) for k, v in obj._modules.items()})
    if isinstance(obj, torch.Tensor):
        return ("tensor", id(obj), type(obj), obj.device, obj.detach().clone())
    if depth > 8:
        return ("deep", id(obj))
    if isinstance(obj, dict):
        return ("dict", id(obj), {k: fingerprint(v, depth + 1) for k, v in obj.items()})
    if isinstance(obj, (list, tuple, set)):
        return (type(obj).__name__, id(obj), [fingerprint(v, depth + 1) for v in obj])
    return ("object", id(obj))


def same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.device == b.device and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def model_state(model: nn.Module) -> dict:
    return {name: fingerprint(m) for name, m in model.named_modules()}


def accept_zeroed_gammas(before: dict, after: dict, model: nn.Module) -> list[str]:
    """zero_init's job is to zero the residual_last γ: take their new values into ``before``."""
    zeroed = [n for n, p in model.named_parameters() if n.endswith("weight") and not p.any()]
    for name in zeroed:
        owner, attr = name.rsplit(".", 1)
        before[owner][3]["_parameters"][2][attr] = after[owner][3]["_parameters"][2][attr]
    return zeroed


def call(entry: str, model: nn.Module, x: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero_init's "nothing to zero" on a model without residual_last
        if entry == "analyze":
            gg.analyze(model, x)
        elif entry == "param_groups":
            gg.param_groups(model, 5e-4, x)
        elif entry == "zero_init":
            gg.zero_init(model, x)
        else:
            gg.verify(model, x)


ENTRY_POINTS = ["analyze", "param_groups", "zero_init", "verify"]


def test_the_issue_example_runs_after_analyze():
    m = Lazy()
    gg.analyze(m, torch.randn(1, 3, 8, 8))
    assert m.table is None
    assert m(torch.randn(1, 3, 8, 8)).shape == (1, 4, 8, 8)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("cls", [Lazy, Caches])
def test_every_cache_is_left_as_it_was(entry, cls):
    model = cls().train()
    before = model_state(model)
    call(entry, model, X)
    after = model_state(model)
    if entry == "zero_init":
        assert accept_zeroed_gammas(before, after, model) == (["bn2.weight"] if cls is Caches else [])
    assert same(before, after)
    assert not hasattr(model, "first_use") and "cos" not in model._buffers
    assert model(X).shape == (2, 4, 8, 8)  # and the next real forward pass works


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_caches_already_filled_stay_the_same_objects_and_values(entry):
    model = Caches()
    model(torch.randn(2, 3, 8, 8))  # the user's own first call fills the caches for real
    before = model_state(model)
    call(entry, model, X)
    after = model_state(model)
    if entry == "zero_init":
        assert accept_zeroed_gammas(before, after, model) == ["bn2.weight"]
    assert same(before, after)
    assert model.calls.tolist() == [1, 1] and len(model.nested["masks"]) == 1


def test_the_real_pass_after_a_failed_meta_pass_starts_from_clean_caches(forward_pass):
    model = NeedsValues()
    before = model_state(model)
    report = gg.analyze(model, X)
    assert report.traced_on == "real"  # the meta pass failed after filling the caches with meta tensors
    assert {e.param_name: e.role for e in report.entries} == {"bn1.weight": "stream", "bn2.weight": "residual_last"}
    assert same(before, model_state(model))
    assert model(X).shape == (2, 4, 8, 8)


def test_a_lazy_module_stays_lazy():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    report = gg.analyze(model, X)
    assert [(p.name, p.kind, p.shape) for p in report.params[-2:]] == [("3.weight", "weight", (2, 144)),
                                                                      ("3.bias", "bias", (2,))]
    assert type(model[3]) is nn.LazyLinear and model[3].has_uninitialized_params()
    torch.manual_seed(0)
    out = model(X)
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("3.")}, strict=False)
    torch.manual_seed(0)
    assert torch.equal(out, fresh(X))  # initialized by its first real call, as if never analyzed


class Sets(Lazy):
    """Sets forward fills: the devices and sizes it has seen (on the meta pass, a "meta" device), and
    a set inside a dict."""

    def __init__(self):
        super().__init__()
        self.devices: set[str] = set()
        self.seen = {"sizes": {3}}

    def forward(self, x):
        self.devices.add(x.device.type)
        self.seen["sizes"].add(x.shape[-1])
        return super().forward(x)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("filled", [False, True])
def test_sets_forward_fills_are_left_as_they_were(entry, filled):
    model = Sets()
    if filled:
        model(X)  # the user's own call: {"cpu"} and {3, 8}
    devices, sizes = model.devices, model.seen["sizes"]
    want = ({"cpu"}, {3, 8}) if filled else (set(), {3})
    call(entry, model, X)
    assert model.devices is devices and model.seen["sizes"] is sizes
    assert (devices, sizes) == want


def test_torchvisions_anchor_generator_keeps_its_anchors():
    """Detection models rebuild their anchors on the input's device in every forward pass."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.anchor_generator = AnchorGenerator(((16,),), ((1.0,),))

        def forward(self, x):
            f = self.bn(self.conv(x))
            return f, self.anchor_generator(ImageList(x, [(8, 8)] * x.shape[0]), [f])

    model = Detector()
    anchors = model.anchor_generator.cell_anchors
    gg.analyze(model, X)
    assert model.anchor_generator.cell_anchors is anchors and anchors[0].device.type == "cpu"
    assert len(model(X)[1]) == 2


def test_hooks_registered_by_forward_go_and_the_users_hooks_stay():
    class HooksItself(Lazy):
        def forward(self, x):
            if not self.bn._forward_hooks:
                self.bn.register_forward_hook(lambda m, i, o: None)
            return super().forward(x)

    model = HooksItself()
    seen = []
    model.conv.register_forward_hook(lambda m, i, o: seen.append(o.device.type))
    hooks = dict(model.conv._forward_hooks)
    gg.analyze(model, X)
    assert not model.bn._forward_hooks and dict(model.conv._forward_hooks) == hooks
    seen.clear()
    model(X)
    assert seen == ["cpu"]


def test_the_order_of_the_users_hooks_stays_when_forward_adds_one():
    """Hooks registered with ``prepend=True`` run first: putting a hook dict back keeps that order."""
    class HooksItself(Lazy):
        def forward(self, x):
            self.conv.register_forward_hook(lambda m, i, o: None)
            return super().forward(x)

    model = HooksItself()
    model.conv.register_forward_hook(lambda m, i, o: None)
    model.conv.register_forward_hook(lambda m, i, o: None, prepend=True)
    order = list(model.conv._forward_hooks.items())
    gg.analyze(model, X)
    assert list(model.conv._forward_hooks.items()) == order

"""The elements a walk says carry a γ, checked against autograd (found by mutation testing of
channels.py, whose one-line bugs rarely change a role).

Each case feeds a normalization's output ``a`` and another feature ``b`` (no normalization) into a
few ops and returns the result. A walk from the norm ends at the model output (``head``) with a
reach: the elements scaled by the γ and the elements mixed with other features. The function
itself says the same: an output element that depends on ``a`` is scaled when it depends on nothing
else or when doubling ``a`` doubles it (a product with other features passes the γ's scale on), and
mixed otherwise. For the ops the channel engine follows the reach must be exactly that; for every
case it is sound: no element that depends on ``a`` is missing from it (an op the engine does not
follow makes it coarser, never smaller)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gammaguide.analysis import trace_model
from gammaguide.masks import ALL
from gammaguide.verify import _mask_tensor


def as_bool(mask, shape: tuple[int, ...]) -> torch.Tensor:
    """A mask (masks.py) as the boolean tensor of the elements it holds."""
    if mask is None:
        return torch.zeros(shape, dtype=torch.bool)
    if mask is ALL:
        return torch.ones(shape, dtype=torch.bool)
    return _mask_tensor(mask, torch.Size(shape))


class Model(nn.Module):
    def __init__(self, tail):
        super().__init__()
        self.ca, self.bn, self.cb = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 1)
        self.tail = tail

    def forward(self, x):
        return self.tail(self.bn(self.ca(x)), self.cb(x))


def reach_and_truth(tail):
    """(scaled, mixed) by the walk, then by the function, on the output's elements."""
    x = torch.randn(2, 3, 4, 4)
    model = Model(tail).eval()
    df = trace_model(model, x, on_meta=False).flow
    [u] = df.uses()["bn.weight"]
    with torch.no_grad():
        a, b = model.bn(model.ca(x)), model.cb(x)
        shape = tuple(tail(a, b).shape)
    heads = [e for e in df.events(u) if e.role == "head"]
    assert len(heads) <= 1
    reach = heads[0].reach if heads else (None, None)

    def depends(jac: torch.Tensor) -> torch.Tensor:
        return jac.reshape(torch.Size(shape).numel(), -1).ne(0).any(1).view(shape)

    on_a = depends(torch.autograd.functional.jacobian(lambda t: tail(t, b), a))
    on_b = depends(torch.autograd.functional.jacobian(lambda t: tail(a, t), b))
    with torch.no_grad():
        homogeneous = torch.isclose(tail(2 * a, b), 2 * tail(a, b), rtol=1e-5, atol=1e-6)
    scaled = on_a & (~on_b | homogeneous)
    return as_bool(reach[0], shape), as_bool(reach[1], shape), scaled, on_a & ~scaled


def C(a, b):
    return torch.cat([a, b], 1)  # (2, 8, 4, 4): channels 0-3 are the γ's


INDEX = [6, 1, 3, 0]
_weights = torch.Generator().manual_seed(0)
W_DENSE, W_GROUPS2, W_DEPTHWISE, W_DEPTHWISE2 = (
    torch.randn(shape, generator=_weights) for shape in ((8, 8, 3, 3), (8, 4, 3, 3), (8, 1, 3, 3), (16, 1, 3, 3)))


class Picked(nn.Module):
    """Channels picked by an index held in a buffer (values known on the meta pass too), in
    ``pick(x, index)``; the index kept as a 2-D buffer and flattened, a view of it."""

    def __init__(self, pick):
        super().__init__()
        self.pick = pick
        self.register_buffer("index", torch.tensor(INDEX).view(2, 2))

    def forward(self, a, b):
        return self.pick(C(a, b), self.index.flatten())

# Ops the engine follows: the reach is exact.
MOVES = {
    "times b": lambda a, b: a * b,
    "times b, half of it": lambda a, b: C(a, b) * C(b, b),
    "squared": lambda a, b: C(a, b) * C(a, b),
    "plus a constant": lambda a, b: C(a, b) + 1.0,
    "atan2 with b": lambda a, b: torch.atan2(C(a, b), C(b, a)),
    "gated by a sigmoid of a": lambda a, b: b * torch.sigmoid(a),
    "gated by a softmax of a": lambda a, b: C(b, b) * torch.softmax(C(a, b), 1),
    "its own gate (silu)": lambda a, b: C(a, b) * torch.sigmoid(C(a, b)),
    "hypot of a and a, laid out": lambda a, b: torch.hypot(C(a, b), C(a * 0.5, 2 * b)),
    "atan2 of a mixed tensor and a": lambda a, b: torch.atan2(torch.atan2(a, b), a),
    "hypot of a mixed half and a": lambda a, b: torch.hypot(C(torch.atan2(a, b), a), C(a, a)),
    "stack of a mixed tensor": lambda a, b: torch.stack([torch.atan2(a, b), b, a], 2),
    "an op the engine does not know, on a alone": lambda a, b: a.logcumsumexp(1),
    "sorted, a alone": lambda a, b: a.sort(1)[0],
    "cat": C,
    "cat three": lambda a, b: torch.cat([b, a, b], 1),
    "cat spatial": lambda a, b: torch.cat([a, b], 3),
    "slice": lambda a, b: C(a, b)[:, 2:6],
    "slice with step": lambda a, b: C(a, b)[:, 1::2],
    "slice negative": lambda a, b: C(a, b)[:, -6:-1],
    "slice spatial": lambda a, b: C(a, b)[..., 1:3],
    "narrow": lambda a, b: C(a, b).narrow(1, 2, 4),
    "select a": lambda a, b: C(a, b).select(1, 2),
    "select b": lambda a, b: C(a, b)[:, 5],
    "split": lambda a, b: torch.split(C(a, b), 3, 1)[1],
    "split last": lambda a, b: torch.split(C(a, b), 3, 1)[2],
    "chunk": lambda a, b: C(a, b).chunk(4, 1)[1],
    "unbind": lambda a, b: C(a, b).unbind(1)[2],
    "view into groups": lambda a, b: C(a, b).view(2, 2, 4, 4, 4),
    "reshape flat": lambda a, b: C(a, b).reshape(2, -1),
    "flatten": lambda a, b: C(a, b).flatten(2),
    "unflatten": lambda a, b: C(a, b).unflatten(1, (4, 2)),
    "transpose": lambda a, b: C(a, b).transpose(1, 3),
    "transpose then slice": lambda a, b: C(a, b).transpose(1, 2)[:, 1:3],
    "permute": lambda a, b: C(a, b).permute(0, 2, 3, 1),
    "permute then flatten then slice": lambda a, b: C(a, b).permute(0, 2, 3, 1).flatten(1, 2)[..., 3:7],
    "movedim": lambda a, b: C(a, b).movedim(1, -1),
    "shuffle by view and transpose": lambda a, b: C(a, b).view(2, 2, 4, 4, 4).transpose(1, 2).reshape(2, 8, 4, 4),
    "channel_shuffle": lambda a, b: F.channel_shuffle(C(a, b), 2),
    "stack": lambda a, b: torch.stack([a, b]),
    "stack last": lambda a, b: torch.stack([b, a], -1),
    "stack middle": lambda a, b: torch.stack([a, b], 2),
    "flip": lambda a, b: C(a, b).flip(1),
    "flip spatial": lambda a, b: C(a, b).flip(2),
    "roll": lambda a, b: C(a, b).roll(3, 1),
    "roll spatial": lambda a, b: C(a, b).roll(1, 3),
    "expand": lambda a, b: C(a, b)[:, :, :1].expand(2, 8, 3, 4),
    "mean over space": lambda a, b: C(a, b).mean((2, 3)),
    "mean over width": lambda a, b: C(a, b).mean(-1),
    "amax keepdim": lambda a, b: C(a, b).amax((2, 3), keepdim=True),
    "sum over channels": lambda a, b: C(a, b).sum(1),
    "avg_pool2d": lambda a, b: F.avg_pool2d(C(a, b), 2),
    "tanh": lambda a, b: C(a, b).tanh(),
    "times two": lambda a, b: C(a, b) * 2,
    "t of a matrix": lambda a, b: C(a, b).flatten(1).t(),
    "t of a vector": lambda a, b: C(a, b)[0, :, 0, 0].t(),
    "select the last": lambda a, b: C(a, b)[:, -1],
    "select spatial": lambda a, b: C(a, b)[:, :, 1],
    "slice samples": lambda a, b: C(a, b)[1:],
    "unbind spatial": lambda a, b: C(a, b).unbind(2)[1],
    "unbind samples": lambda a, b: C(a, b).unbind()[1],
    "split samples": lambda a, b: torch.split(C(a, b), 1)[1],
    "chunk samples": lambda a, b: C(a, b).chunk(2)[1],
    "repeat along height": lambda a, b: C(a, b).repeat(1, 1, 2, 1),
    "stack a twice": lambda a, b: torch.stack([a, b, 2 * a], 1),
    "stack two mixed tensors": lambda a, b: torch.stack([torch.atan2(a, b), b, torch.atan2(a, 2 * b)], 1),
    "atan2 of a mixed half and a, apart": lambda a, b: torch.atan2(C(torch.atan2(a, b), b), C(b, a)),
    "a mixed half plus b": lambda a, b: C(torch.atan2(a, b), b) + C(b, b),
    "gated by a sigmoid of a, seen through views": lambda a, b: b * torch.sigmoid(a.mean((2, 3)))[:, :, None, None],
    "conv": lambda a, b: F.conv2d(C(a, b), W_DENSE, padding=1),
    "conv, 2 groups": lambda a, b: F.conv2d(C(a, b), W_GROUPS2, padding=1, groups=2),
    "conv, 2 groups straddling": lambda a, b: F.conv2d(torch.cat([b[:, :2], a, b[:, 2:]], 1), W_GROUPS2, groups=2),
    "depthwise conv": lambda a, b: F.conv2d(C(a, b), W_DEPTHWISE, padding=1, groups=8),
    "depthwise conv, two per channel": lambda a, b: F.conv2d(C(a, b), W_DEPTHWISE2, padding=1, groups=8),
    "conv of b by a": lambda a, b: F.conv2d(b, a),
    "conv of a by b": lambda a, b: F.conv2d(a, b),
    "index_select by a buffer": Picked(lambda x, i: x.index_select(1, i)),
    "index by a buffer": Picked(lambda x, i: x[:, i]),
    # Attention on (samples, heads, positions, features): a γ in the queries or keys alone sets the
    # softmax's temperature over other features, so its elements are mixed; in the values, scaled.
    "attention, the values": lambda a, b: F.scaled_dot_product_attention(C(b, b), C(b, b), C(a, b)),
    "attention, the queries": lambda a, b: F.scaled_dot_product_attention(C(a, b), C(b, b), C(b, b)),
    "attention, the keys": lambda a, b: F.scaled_dot_product_attention(C(b, b), C(a, b), C(b, b)),
    "attention, all three": lambda a, b: F.scaled_dot_product_attention(C(a, b), C(a, b), C(a, b)),
    "attention, values whose features half carry it": lambda a, b: F.scaled_dot_product_attention(
        b, b, torch.cat([a, b], 3)[..., 2:6]),
    "attention, values whose positions half carry it": lambda a, b: F.scaled_dot_product_attention(
        b, b, torch.cat([a, b], 2)[:, :, 2:6]),
    "attention by hand, the queries": lambda a, b: torch.softmax(C(a, b) @ C(b, b).transpose(-1, -2), -1) @ C(b, b),
    "attention by hand, the values": lambda a, b: torch.softmax(C(b, b) @ C(b, b).transpose(-1, -2), -1) @ C(a, b),
}

# Ops the engine does not follow element by element, and ops that pick elements (autograd sees the
# one picked; the engine calls every element mixed): only soundness.
COARSE = {
    "maximum with b": lambda a, b: torch.cat([torch.maximum(a[:, :2], b[:, :2]), a[:, 2:]], 1),
    "clamped by b": lambda a, b: a.clamp(min=b),
    "where, b's condition, a times b or b": lambda a, b: torch.where(b > 0, a * b, b),
    "where, b's condition": lambda a, b: torch.where(b > 0, a, b),
    "masked_fill by b": lambda a, b: a.masked_fill(b > 0, 0.0),
    "cumsum over channels": lambda a, b: C(a, b).cumsum(1),
    # a piece that holds the γ in some channels is taken whole along the stacked dimension's slice
    "stack of mixed halves": lambda a, b: torch.stack([C(torch.atan2(a, b), b), C(b, a)], 1),
    "an op the engine does not know, on a and b": lambda a, b: C(a, b).logcumsumexp(1),
    "an op the engine does not know, on a mixed tensor": lambda a, b: torch.atan2(a, b).logcumsumexp(1),
    "index_select": lambda a, b: C(a, b).index_select(1, torch.tensor(INDEX)),
    "index with a list": lambda a, b: C(a, b)[:, [0, 5, 3]],
    "pad channels": lambda a, b: F.pad(C(a, b), (0, 0, 0, 0, 2, 1)),
    "pad space": lambda a, b: F.pad(C(a, b), (1, 1, 1, 1)),
    "repeat": lambda a, b: C(a, b).repeat(1, 2, 1, 1),
}


@pytest.mark.parametrize("name", sorted(MOVES))
def test_the_reach_through_the_ops_the_engine_follows_is_exact(name):
    scaled, mixed, truly_scaled, truly_mixed = reach_and_truth(MOVES[name])
    assert torch.equal(scaled, truly_scaled), name
    assert torch.equal(mixed, truly_mixed), name


@pytest.mark.parametrize("name", sorted(MOVES) + sorted(COARSE))
def test_the_reach_never_misses_an_element_that_depends_on_the_gamma(name):
    scaled, mixed, truly_scaled, truly_mixed = reach_and_truth({**MOVES, **COARSE}[name])
    assert not ((truly_scaled | truly_mixed) & ~(scaled | mixed)).any(), name
    assert not (truly_mixed & scaled).any(), name  # nothing mixed is called a plain scaling


# ----------------------------------------------------------------------------- does a later norm cancel the γ?


class Tail(nn.Module):
    """``norm(arrange(a, b))``: a later normalization, in training mode, of the γ's output laid
    out with another feature."""

    def __init__(self, arrange, norm: nn.Module):
        super().__init__()
        self.arrange, self.norm = arrange, norm

    def forward(self, a, b):
        return self.norm(self.arrange(a, b))


class MeanStd(nn.Module):
    """A hand-written normalization over ``dims`` (the behavioural rule finds it)."""

    def __init__(self, dims: tuple[int, ...], channels: int):
        super().__init__()
        self.dims = dims
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x):
        return self.weight * (x - x.mean(self.dims, keepdim=True)) / (x.var(self.dims, keepdim=True) + 1e-5).sqrt()


def channels_last(norm: nn.Module) -> nn.Module:
    return nn.Sequential(Permute(0, 2, 3, 1), norm)


class Permute(nn.Module):
    def __init__(self, *order: int):
        super().__init__()
        self.order = order

    def forward(self, x):
        return x.permute(*self.order)


def middle(a, b):
    return torch.cat([b[:, :2], a, b[:, 2:]], 1)  # channels b b a a a a b b


def off_by_one(a, b):
    return torch.cat([b[:, :3], a, b[:, 3:]], 1)  # channels b b b a a a a b: pairs straddle a and b


# A tiny eps: rows of four elements can have a small variance, where the usual eps would blur the test.
EPS = 1e-10
LATER_NORMS = {
    "batch norm": (C, lambda: nn.BatchNorm2d(8, eps=EPS)),
    "instance norm": (C, lambda: nn.InstanceNorm2d(8, affine=True, eps=EPS)),
    "group norm, 2 groups": (C, lambda: nn.GroupNorm(2, 8, eps=EPS)),
    "group norm, 4 groups": (C, lambda: nn.GroupNorm(4, 8, eps=EPS)),
    "group norm, 1 group": (C, lambda: nn.GroupNorm(1, 8, eps=EPS)),
    "group norm, 2 groups, each holding both": (middle, lambda: nn.GroupNorm(2, 8, eps=EPS)),
    "group norm, 4 groups, b a a b": (middle, lambda: nn.GroupNorm(4, 8, eps=EPS)),
    "group norm, 4 groups, straddling": (off_by_one, lambda: nn.GroupNorm(4, 8, eps=EPS)),
    "layer norm over width": (C, lambda: nn.LayerNorm(4, eps=EPS)),
    "layer norm over all": (C, lambda: nn.LayerNorm((8, 4, 4), eps=EPS)),
    "layer norm over width, cat along it": (lambda a, b: torch.cat([a, b], 3), lambda: nn.LayerNorm(8, eps=EPS)),
    "layer norm channels last": (C, lambda: channels_last(nn.LayerNorm(8, eps=EPS))),
    "rms norm channels last": (C, lambda: channels_last(nn.RMSNorm(8, eps=EPS))),
    "rms norm channels last, a alone": (lambda a, b: a * 1.0, lambda: channels_last(nn.RMSNorm(4, eps=EPS))),
    "mean/std over space": (C, lambda: MeanStd((2, 3), 8)),
    "mean/std over channels": (C, lambda: MeanStd((1,), 8)),
    "mean/std over channels and height": (C, lambda: MeanStd((1, 2), 8)),
    "mean/std over height, cat along it": (lambda a, b: torch.cat([a, b], 2), lambda: MeanStd((2,), 4)),
    "batch norm of a padded tensor": (lambda a, b: F.pad(C(a, b), (1, 1, 1, 1)), lambda: nn.BatchNorm2d(8, eps=EPS)),
    "batch norm after attention, the queries": (
        lambda a, b: F.scaled_dot_product_attention(C(a, b), C(b, b), C(b, b)), lambda: nn.BatchNorm2d(8, eps=EPS)),
    "layer norm after attention, the keys": (
        lambda a, b: F.scaled_dot_product_attention(C(b, b), C(a, b), C(b, b)), lambda: nn.LayerNorm(4, eps=EPS)),
    "batch norm after attention, the values": (
        lambda a, b: F.scaled_dot_product_attention(C(b, b), C(b, b), C(a, b)), lambda: nn.BatchNorm2d(8, eps=EPS)),
    "batch norm after attention by hand, the queries": (
        lambda a, b: torch.softmax(C(a, b) @ C(b, b).transpose(-1, -2), -1) @ C(b, b),
        lambda: nn.BatchNorm2d(8, eps=EPS)),
}


# A piece whose γ elements vary along one dimension (its channels), concatenated or stacked along
# another, keeps its channels there (masks.place; it was once taken whole, and a later norm over the
# channels then looked invariant: the γ was called scale_invariant where the network is not).
LATER_NORMS.update({
    "stacked, then a layer norm over channels": (
        lambda a, b: torch.stack([C(a, b), C(b, b)], 1).permute(0, 1, 3, 4, 2), lambda: nn.LayerNorm(8, eps=EPS)),
    "concatenated along width, then a layer norm over channels": (
        lambda a, b: torch.cat([C(a, b), C(b, b)], 3).permute(0, 2, 3, 1), lambda: nn.LayerNorm(8, eps=EPS)),
    "stacked last, then a layer norm over channels": (
        lambda a, b: torch.stack([C(a, b), C(b, b)], -1).permute(0, 2, 3, 4, 1), lambda: nn.LayerNorm(8, eps=EPS)),
    "concatenated along the batch, then a layer norm over channels": (
        lambda a, b: torch.cat([C(a, b), C(b, b)], 0).permute(0, 2, 3, 1), lambda: nn.LayerNorm(8, eps=EPS)),
    "concatenated along width, then a batch norm": (
        lambda a, b: torch.cat([C(a, b), C(b, b)], 3), lambda: nn.BatchNorm2d(8, eps=EPS)),
})


@pytest.mark.parametrize("name", sorted(LATER_NORMS))
def test_a_later_norm_cancels_the_gamma_exactly_when_it_does_numerically(name):
    import gammaguide as gg

    arrange, make_norm = LATER_NORMS[name]
    model = Model(Tail(arrange, make_norm()))
    x = torch.randn(2, 3, 4, 4)
    role = {e.param_name: e.role for e in gg.analyze(model, x, warn=False).entries}["bn.weight"]
    model.train()
    with torch.no_grad():
        a, b = model.bn(model.ca(x)), model.cb(x)
        # Weight decay shrinks the whole γ by one factor: is the model's output blind to it?
        cancels = torch.allclose(model.tail(a, b), model.tail(a * 2.5, b), rtol=1e-4, atol=1e-4)
    assert role == ("scale_invariant" if cancels else "merged"), (name, role, cancels)

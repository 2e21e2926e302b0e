"""Channel ranges (issue 9, section 3): concatenations, slices, splits, index selections and
shuffles route some channels one way and others another; a γ's role depends on where its own
channels go, and ``scale_invariant`` is claimed only where doubling γ and β is divided out.

Each module here is also checked with ``gg.verify``: the role a test expects is the one the
numbers confirm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gammaguide as gg

# Every test twice: analyze's default pass on meta tensors, and the real pass (conftest.py).
pytestmark = pytest.mark.usefixtures("forward_pass")

D = 8
IMAGE = torch.randn(2, 3, 8, 8)


def conv_bn(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


def verified(model: nn.Module, x) -> dict[str, tuple[str, str]]:
    """γ -> (role, verify's result); no check may fail."""
    checks = gg.verify(model, x)
    assert not [c for c in checks if c.result == "fail"], [c for c in checks if c.result == "fail"]
    return {c.param_name: (c.role, c.result) for c in checks}


# ----------------------------------------------------------------------------- slices of a concatenation


def first_half(spelling: str, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Channels 0..D-1 of a 2D-channel tensor, spelled every way (``index``: a buffer, 0..D-1)."""
    if spelling == "h[:, :D]":
        return h[:, :D]
    if spelling == "narrow":
        return h.narrow(1, 0, D)
    if spelling == "split":
        return h.split(D, dim=1)[0]
    if spelling == "split_with_sizes":
        return torch.split(h, [D, D], dim=1)[0]
    if spelling == "chunk":
        return h.chunk(2, dim=1)[0]
    if spelling == "index_select":
        return h.index_select(1, index)
    if spelling == "h[:, index]":
        return h[:, index]
    if spelling == "unbind":
        return torch.stack(h.unflatten(1, (2, D)).unbind(1)[0:1], 1).flatten(1, 2)
    raise AssertionError(spelling)


SLICES = ["h[:, :D]", "narrow", "split", "split_with_sizes", "chunk", "index_select", "h[:, index]", "unbind"]


class Routed(nn.Module):
    """Two norms concatenated; only the first one's channels are the skip of a residual add, the
    second one's go into a conv and a norm."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.a, self.b = conv_bn(3, D), conv_bn(3, D)
        self.branch1, self.branch2 = conv_bn(D, D), conv_bn(D, D)
        self.other = conv_bn(D, D)
        self.fc = nn.Linear(2 * D, 2)
        self.register_buffer("index", torch.arange(D))

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        skip = first_half(self.spelling, h, self.index)
        out = skip + self.branch2(torch.relu(self.branch1(skip)))
        rest = self.other(h[:, D:])
        return self.fc(torch.cat([out, rest], 1).mean((2, 3)))


@pytest.mark.parametrize("spelling", SLICES)
def test_only_the_channels_a_slice_keeps_reach_the_skip(spelling, roles):
    got = roles(gg.analyze(Routed(spelling), IMAGE))
    assert got == {"a.1.weight": "stream", "b.1.weight": "scale_invariant", "branch1.1.weight": "scale_invariant",
                   "branch2.1.weight": "residual_last", "other.1.weight": "head"}


def test_indices_the_forward_pass_computes_are_not_followed(roles):
    """On meta tensors ``torch.arange(D, device=x.device)`` has no values: such an index selects
    from the whole tensor on both passes (the node-level answer), so that both agree."""

    class Computed(Routed):
        def forward(self, x):
            h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
            skip = h.index_select(1, torch.arange(D, device=x.device))
            out = skip + self.branch2(torch.relu(self.branch1(skip)))
            return self.fc(torch.cat([out, self.other(h[:, D:])], 1).mean((2, 3)))

    got = roles(gg.analyze(Computed("index_select"), IMAGE))
    assert got["a.1.weight"] == got["b.1.weight"] == "stream"


class DualPath(nn.Module):
    """Dual-path blocks as in DPN: each returns ``cat([x_s1 + out1, x_s2, out2])`` and the next one
    adds to ``x[:, :K]`` only, so ``out2``'s channels never reach a skip."""

    K, INC = 8, 4

    def __init__(self, blocks: int = 3):
        super().__init__()
        self.stem = conv_bn(3, self.K)
        self.a, self.b = nn.ModuleList(), nn.ModuleList()
        width = self.K
        for _ in range(blocks):
            self.a.append(nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 1, bias=False)))
            self.b.append(nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(),
                                        nn.Conv2d(width, self.K + self.INC, 3, padding=1, bias=False)))
            width += self.INC
        self.final = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for a, b in zip(self.a, self.b, strict=True):
            x_s1, x_s2 = x[:, :self.K], x[:, self.K:]
            y = b(a(x))
            out1, out2 = y[:, :self.K], y[:, self.K:]
            x = torch.cat([x_s1 + out1, x_s2, out2], dim=1)
        return self.fc(torch.relu(self.final(x)).mean((2, 3)))


def test_dual_path_block_last_norm_ends_a_branch(roles):
    got = roles(gg.analyze(DualPath(), IMAGE))
    assert got == {"stem.1.weight": "stream", "final.weight": "head",
                   **{f"a.{i}.0.weight": "scale_invariant" for i in range(3)},
                   **{f"b.{i}.0.weight": "residual_last" for i in range(3)}}


def test_timm_dpn68(roles):
    """timm's DPN: each block's last norm ends its residual branch (was `shortcut`: its `out2`
    channels seemed to reach the next block's `x[:, :k]`)."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("dpn68", num_classes=10)
    got = roles(gg.analyze(model, torch.randn(1, 3, 64, 64), warn=False))
    last = {p: r for p, r in got.items() if ".c1x1_c.bn." in p}
    projections = {p: r for p, r in got.items() if ".c1x1_w_s" in p}
    assert len(last) == 22 and set(last.values()) == {"residual_last"}
    assert len(projections) == 4 and set(projections.values()) == {"shortcut"}


# ----------------------------------------------------------------------------- concatenate, then normalize


class ConcatNorm(nn.Module):
    """Two norms' outputs concatenated, then (``mix``) a channel-mixing conv, and a norm of kind
    ``norm`` over all the channels."""

    def __init__(self, norm: str, mix: bool):
        super().__init__()
        self.mix = mix
        self.a, self.b = conv_bn(3, D), conv_bn(3, D)
        self.conv = nn.Conv2d(2 * D, 2 * D, 3, padding=1, bias=False)
        self.norm = {"batch": nn.BatchNorm2d(2 * D), "layer": nn.GroupNorm(1, 2 * D),
                     "group2": nn.GroupNorm(2, 2 * D), "group4": nn.GroupNorm(4, 2 * D),
                     "group3ch": nn.GroupNorm(2, 2 * D)}[norm]
        self.fc = nn.Linear(2 * D, 2)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        if self.mix:
            h = self.conv(h)
        return self.fc(torch.relu(self.norm(h)).mean((2, 3)))


@pytest.mark.parametrize(("norm", "mix", "role"), [
    ("batch", False, "scale_invariant"),  # one statistic per channel: each input's channels alone
    ("group2", False, "scale_invariant"),  # the two groups are exactly the two inputs
    ("group4", False, "scale_invariant"),  # each group inside one input
    ("layer", False, "merged"),  # one statistic over both inputs
    ("batch", True, "merged"),  # the conv mixes both inputs into every channel
])
def test_a_norm_after_a_concatenation_cancels_a_gamma_only_per_group(norm, mix, role):
    model, x = ConcatNorm(norm, mix), IMAGE
    got = verified(model, x)
    assert got["a.1.weight"] == (role, "pass") and got["b.1.weight"] == (role, "pass")


class UNet(nn.Module):
    """Encoder norm, decoder norm, both concatenated and mixed by a conv, then normalized."""

    def __init__(self):
        super().__init__()
        self.enc = conv_bn(3, D)
        self.down = conv_bn(D, D)
        self.up = nn.ConvTranspose2d(D, D, 2, stride=2, bias=False)
        self.dec = conv_bn(2 * D, D)
        self.head = nn.Conv2d(D, 2, 1)

    def forward(self, x):
        e = torch.relu(self.enc(x))
        d = torch.relu(self.down(nn.functional.max_pool2d(e, 2)))
        return self.head(torch.relu(self.dec(torch.cat([e, self.up(d)], 1))))


def test_unet_concat_then_mix_is_merged_not_scale_invariant():
    got = verified(UNet(), IMAGE)
    assert got == {"enc.1.weight": ("merged", "pass"), "down.1.weight": ("merged", "pass"),
                   "dec.1.weight": ("head", "not_applicable")}


# ----------------------------------------------------------------------------- shuffles


def shuffle(x: torch.Tensor, groups: int, how: str) -> torch.Tensor:
    if how == "view-transpose":
        b, c, h, w = x.shape
        return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
    if how == "permute-reshape":
        b, c, h, w = x.shape
        return x.reshape(b, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(b, c, h, w)
    return nn.functional.channel_shuffle(x, groups)


class Shuffled(nn.Module):
    """ShuffleNet v2 units: half the channels pass, half go through a branch; concatenated and shuffled."""

    def __init__(self, how: str, units: int = 3):
        super().__init__()
        self.how = how
        self.stem = conv_bn(3, 2 * D)
        self.branches = nn.ModuleList(
            nn.Sequential(conv_bn(D, D, 1), nn.ReLU(), conv_bn(D, D), conv_bn(D, D, 1), nn.ReLU())
            for _ in range(units))
        self.final = conv_bn(2 * D, D, 1)
        self.fc = nn.Linear(D, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for branch in self.branches:
            x1, x2 = x.chunk(2, dim=1)
            x = shuffle(torch.cat([x1, branch(x2)], 1), 2, self.how)
        return self.fc(torch.relu(self.final(x)).mean((2, 3)))


@pytest.mark.parametrize("how", ["view-transpose", "permute-reshape", "channel_shuffle"])
def test_a_channel_shuffle_mixes_a_branch_into_the_next_one(how):
    got = verified(Shuffled(how), IMAGE)
    for i in range(3):
        assert got[f"branches.{i}.0.1.weight"] == ("scale_invariant", "pass")
        assert got[f"branches.{i}.2.1.weight"] == ("scale_invariant", "pass")
        assert got[f"branches.{i}.3.1.weight"] == ("merged", "pass")  # its output is shuffled into the next conv
    assert got["stem.1.weight"] == ("merged", "pass")
    assert got["final.1.weight"][0] == "head"


def test_torchvision_shufflenet_v2(roles):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.shufflenet_v2_x1_0()
    got = roles(gg.analyze(model, torch.randn(1, 3, 64, 64)))
    merged = {p for p, r in got.items() if r == "merged"}
    # The last norm of every branch (16 units) and of the side branch of the 3 downsampling units.
    last = {p for p in got if p.endswith("branch2.6.weight") or p.endswith("branch1.3.weight")}
    assert merged == last and len(merged) == 19
    assert got["conv5.1.weight"] == "head"
    assert {r for p, r in got.items() if p not in merged | {"conv5.1.weight"}} == {"scale_invariant"}


def test_densenet_norms_after_concatenation_stay_scale_invariant(roles):
    """DenseNet normalizes each concatenation with a BatchNorm, channel by channel: every γ is
    divided out by the next BatchNorm, its channels alone in their statistics."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.densenet121()
    got = roles(gg.analyze(model, torch.randn(1, 3, 64, 64)))
    assert {r for p, r in got.items() if p != "features.norm5.weight"} == {"scale_invariant"}


class Tokens(nn.Module):
    """A class token concatenated along the tokens: a LayerNorm normalizes each token alone."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Linear(D, D), nn.LayerNorm(D)
        self.cls = nn.Parameter(torch.zeros(1, 1, D))
        self.fc, self.norm2, self.head = nn.Linear(D, D, bias=False), nn.LayerNorm(D), nn.Linear(D, 2)

    def forward(self, x):
        t = self.norm(self.embed(x))
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1)
        return self.head(self.norm2(self.fc(torch.relu(t)))[:, 0])


def test_a_concatenation_along_tokens_keeps_a_layernorm_per_token():
    got = verified(Tokens(), torch.randn(2, 5, D))
    assert got["norm.weight"] == ("scale_invariant", "pass")


def test_mask_moves_are_memoized_by_value_and_take_lists():
    # The moves are memoized (masks.py); indices and permutations given as lists must still work,
    # and a repeated move must give the same mask without being computed again.
    from gammaguide import masks

    m = masks.part((-2, -1), (4, 3), 0b100_010_001_111)
    kept = masks.take(m, 3, 1, [0, 2])
    hits = masks._take.cache_info().hits
    assert masks.take(m, 3, 1, (0, 2)) == kept == masks.take(masks.Part(m.dims, m.sizes, m.bits), 3, 1, [0, 2])
    assert masks._take.cache_info().hits == hits + 2
    assert kept == masks.part((-2, -1), (2, 3), 0b010_111)
    swapped = masks.permute(m, [5, 4, 3], [0, 2, 1])
    assert masks.permute(m, (5, 4, 3), (0, 2, 1)) == swapped
    assert masks.reshape(swapped, [5, 3, 4], [5, 12]) == masks.reshape(swapped, (5, 3, 4), (5, 12))
    assert masks.take(None, 3, 1, [0]) is None and masks.permute(masks.ALL, (5, 4, 3), [0, 2, 1]) is masks.ALL

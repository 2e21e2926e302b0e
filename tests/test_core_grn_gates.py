"""GRN keeps its input, so it is no normalization; a norm that drives a gate is not scale-invariant.

ConvNeXt-V2's Global Response Normalization computes ``γ·(x·N(x)) + β + x``: it adds its input back,
so it does not divide out its input's scale. The LayerNorm before it therefore reaches the block's
residual sum (``residual_last``), and GRN's own parameters are no γ (listed with the other 1-D
parameters), however GRN is written. A norm on a squeeze-excitation or split-attention gate only
sets how a sigmoid or softmax saturates: the gate multiplies other features, and no later norm
divides that out, so its γ is ``merged``, which verify checks by doubling it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gammaguide as gg

pytestmark = pytest.mark.usefixtures("forward_pass")

D = 8


class GRN(nn.Module):
    """As Hugging Face writes it (channels last)."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, d))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, d))

    def forward(self, x):
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.weight * (x * nx) + self.bias + x


class GlobalResponseNorm(nn.Module):
    """As timm writes it: named like a norm, with one addcmul."""

    def __init__(self, d: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        gx = x.norm(p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return x + torch.addcmul(self.bias.view(1, 1, 1, -1), self.weight.view(1, 1, 1, -1), x * nx)


class Block(nn.Module):
    def __init__(self, grn: str):
        super().__init__()
        self.grn_kind = grn
        self.dw = nn.Conv2d(D, D, 7, padding=3, groups=D, bias=False)
        self.norm = nn.LayerNorm(D)
        self.pw1, self.pw2 = nn.Linear(D, 4 * D, bias=False), nn.Linear(4 * D, D, bias=False)
        if grn == "module":
            self.grn = GRN(4 * D)
        elif grn == "timm":
            self.grn = GlobalResponseNorm(4 * D)
        else:  # written out in the block's own forward
            self.grn_weight = nn.Parameter(torch.zeros(1, 1, 1, 4 * D))
            self.grn_bias = nn.Parameter(torch.zeros(1, 1, 1, 4 * D))

    def forward(self, x):
        h = torch.relu(self.pw1(self.norm(self.dw(x).permute(0, 2, 3, 1))))
        if self.grn_kind == "inline":
            gx = torch.linalg.vector_norm(h, ord=2, dim=(1, 2), keepdim=True)
            h = self.grn_weight * (h * (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6))) + self.grn_bias + h
        else:
            h = self.grn(h)
        return x + self.pw2(h).permute(0, 3, 1, 2)


def convnext_v2(grn: str) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, D, 2, 2), Block(grn), Block(grn), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.LayerNorm(D), nn.Linear(D, 3))


IMAGE = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("grn", ["module", "timm", "inline"])
def test_grn_is_no_normalization(grn, roles):
    model = convnext_v2(grn)
    report = gg.analyze(model, IMAGE)
    assert roles(report) == {"1.norm.weight": "residual_last", "2.norm.weight": "residual_last", "5.weight": "head"}
    grn_params = [p for p in report.params if "grn" in p.name]
    assert len(grn_params) == 4 and not any(p.kind in ("gamma", "beta") or p.decay for p in grn_params)
    assert not report.warnings


@pytest.mark.parametrize("grn", ["module", "timm", "inline"])
def test_grn_roles_hold_numerically(grn):
    checks = {c.param_name: c.result for c in gg.verify(convnext_v2(grn), IMAGE)}
    assert checks == {"1.norm.weight": "pass", "2.norm.weight": "pass", "5.weight": "not_applicable"}


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, gate: str = "sigmoid"):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Conv2d(c, 4, 1, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, c, 1, bias=False)
        self.gate = gate

    def forward(self, x):
        g = self.fc2(torch.relu(self.bn(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * (torch.sigmoid(g) if self.gate == "sigmoid" else nn.functional.hardsigmoid(g))


class SplitAttention(nn.Module):
    """ResNeSt's split attention (radix 2): a softmax over the two splits weighs them."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn0 = nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c)
        self.fc1, self.bn1, self.fc2 = nn.Conv2d(c, 4, 1, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 2 * c, 1,
                                                                                                   bias=False)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv(x)))
        b, rc, hh, ww = x.shape
        x = x.reshape(b, 2, rc // 2, hh, ww)
        attn = self.fc2(torch.relu(self.bn1(self.fc1(x.sum(1).mean((2, 3), keepdim=True)))))
        attn = torch.softmax(attn.view(b, 1, 2, -1).transpose(1, 2), dim=1).reshape(b, -1)
        return (x * attn.reshape(b, 2, rc // 2, 1, 1)).sum(dim=1)


class GatedBlock(nn.Module):
    def __init__(self, gate: str):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(D, D, 3, padding=1, bias=False), nn.BatchNorm2d(D)
        self.gate = SplitAttention(D) if gate == "split" else SqueezeExcite(D, gate)
        self.conv2, self.bn2 = nn.Conv2d(D, D, 3, padding=1, bias=False), nn.BatchNorm2d(D)

    def forward(self, x):
        return x + self.bn2(self.conv2(self.gate(torch.relu(self.bn1(self.conv1(x))))))


def gated(gate: str) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, D, 3, padding=1, bias=False), nn.BatchNorm2d(D), nn.ReLU(), GatedBlock(gate),
                         GatedBlock(gate), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(D, 3))


@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid", "split"])
def test_norm_on_a_gate_is_merged(gate, roles):
    got = roles(gg.analyze(gated(gate), torch.randn(4, 3, 8, 8), warn=False))
    norm = "gate.bn1" if gate == "split" else "gate.bn"
    for b in (3, 4):
        assert got[f"{b}.{norm}.weight"] == "merged"
        # The norm before the gate scales the gated features themselves: the next norm divides it out.
        assert got[f"{b}.{'gate.bn0' if gate == 'split' else 'bn1'}.weight"] == "scale_invariant"
        assert got[f"{b}.bn2.weight"] == "residual_last"


@pytest.mark.parametrize("gate", ["sigmoid", "split"])
def test_gate_norm_roles_hold_numerically(gate):
    checks = gg.verify(gated(gate), torch.randn(4, 3, 8, 8))
    assert not [c for c in checks if c.result == "fail"]
    merged = [c for c in checks if c.role == "merged"]
    assert len(merged) == 2 and all(c.result == "pass" for c in merged), merged


def test_silu_written_out_is_no_gate(roles):
    """``x * sigmoid(x)`` multiplies the γ's own features: a nonlinearity like SiLU, not a gate."""
    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    model = nn.Sequential(nn.Conv2d(3, D, 3, bias=False), nn.BatchNorm2d(D), Swish(), nn.Conv2d(D, D, 3, bias=False),
                          nn.BatchNorm2d(D), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(D, 3))
    assert roles(gg.analyze(model, torch.randn(2, 3, 8, 8)))["1.weight"] == "scale_invariant"

"""Wrapped models (torch.compile, DataParallel, DDP), the meta device, and model state after analyze."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import gammaguide as gg
from gammaguide import models

# Every test twice: analyze's default pass on meta tensors, and the real pass (conftest.py).
pytestmark = pytest.mark.usefixtures("forward_pass")

X = torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet20():
    return models.create_model("resnet20")


@pytest.fixture(scope="module")
def plain_roles(resnet20):
    return {e.param_name: e.role for e in gg.analyze(resnet20, X).entries}


def check_wrapped(wrapper: nn.Module, prefix: str, plain_roles: dict[str, str]) -> None:
    """Names are the wrapper's own (``model.named_parameters()``), roles those of the inner model."""
    report = gg.analyze(wrapper, X)
    assert {e.param_name: e.role for e in report.entries} == {prefix + n: r for n, r in plain_roles.items()}
    wrapper_names = [n for n, _ in wrapper.named_parameters()]
    assert [p.name for p in report.params] == wrapper_names
    groups = gg.param_groups(wrapper, 1e-4, X)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in wrapper.parameters())


def test_torch_compile_wrapper(resnet20, plain_roles):
    compiled = torch.compile(resnet20)  # compiles lazily: analyze traces the original module
    assert type(compiled).__name__ == "OptimizedModule"
    check_wrapped(compiled, "_orig_mod.", plain_roles)


def test_data_parallel_wrapper(resnet20, plain_roles):
    check_wrapped(nn.DataParallel(resnet20), "module.", plain_roles)


def test_distributed_data_parallel_wrapper(resnet20, plain_roles, tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        check_wrapped(nn.parallel.DistributedDataParallel(resnet20), "module.", plain_roles)
    finally:
        dist.destroy_process_group()


def test_nested_wrappers(resnet20, plain_roles):
    check_wrapped(torch.compile(nn.DataParallel(resnet20)), "_orig_mod.module.", plain_roles)


# ----------------------------------------------------------------------------- meta device


def test_llama_7b_on_meta_device():
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) > 6e9
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    report = gg.analyze(model, {"input_ids": ids}, warn=False)
    layers = config.num_hidden_layers
    assert len(report.entries) == 2 * layers + 1 == sum(
        type(m).__name__ == "LlamaRMSNorm" for m in model.modules())
    assert report.counts()["residual_last"] == 2 * layers and report.counts()["head"] == 1
    groups = gg.param_groups(model, 0.1, report=report)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(p.device.type == "meta" for p in model.parameters())


def test_meta_model_gets_the_same_roles(plain_roles):
    with torch.device("meta"):
        model = models.create_model("resnet20")
    report = gg.analyze(model, torch.zeros(2, 3, 32, 32, device="meta"))
    assert {e.param_name: e.role for e in report.entries} == plain_roles


def test_meta_default_input_follows_the_model(plain_roles):
    with torch.device("meta"):
        model = models.create_model("resnet20")
    report = gg.analyze(model)
    assert report.input_shapes == ("args[0]: float32[1, 3, 32, 32]",)
    assert {e.param_name: e.role for e in report.entries} == plain_roles


# ----------------------------------------------------------------------------- state after analyze


class HandBN(nn.Module):
    """A hand-written BatchNorm that always normalizes by batch statistics and updates its
    running statistics, in train and eval mode alike."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.5)


def snapshot(model: nn.Module):
    return (
        {n: m.training for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: b.clone() for n, b in model.named_buffers()},
        {n: p.detach().clone() for n, p in model.named_parameters()},
    )


def assert_same_state(before, model: nn.Module) -> None:
    training, grads, buffers, params = before
    now = snapshot(model)
    assert now[0] == training
    assert now[1] == grads
    for n, b in buffers.items():
        assert torch.equal(now[2][n], b) and now[2][n].dtype == b.dtype, n
    for n, p in params.items():
        assert torch.equal(now[3][n], p), n


def messy_resnet20() -> nn.Module:
    """Train mode with one block in eval, frozen layers, non-trivial running statistics."""
    model = models.create_model("resnet20").train()
    model.layers[1].eval()
    model.conv1.requires_grad_(False)
    model.layers[2][0].bn1.weight.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    model.layers[0][0].bn1.momentum = None  # cumulative average: moves on every batch
    return model


@pytest.mark.parametrize("call", ["analyze", "param_groups", "verify"])
def test_state_restored_exactly(call):
    model = messy_resnet20()
    before = snapshot(model)
    if call == "analyze":
        gg.analyze(model, X)
    elif call == "param_groups":
        gg.param_groups(model, 1e-4, X)
    else:
        gg.verify(model, X)
    assert_same_state(before, model)
    assert model.training and not model.layers[1].training


def test_buffers_written_during_the_forward_pass_are_restored(roles):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), HandBN(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))  # materialize the lazy layer
    before = snapshot(model)
    report = gg.analyze(model, torch.randn(2, 3, 8, 8) * 5 + 3)
    assert roles(report) == {"1.weight": "head"}
    assert_same_state(before, model)


def test_state_restored_when_the_forward_raises():
    model = messy_resnet20()
    before = snapshot(model)
    with pytest.raises(gg.GammaGuideError):
        gg.analyze(model, torch.randn(2, 5, 32, 32))
    assert_same_state(before, model)

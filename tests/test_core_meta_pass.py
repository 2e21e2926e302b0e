"""The forward pass on shapes alone (shapes.py): same answers as a real pass, a real pass when
the model needs values, and the shape cache."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gammaguide as gg
from gammaguide import specs
from gammaguide.analysis import build_report, trace_model
from gammaguide.policy import resolve_policy
from gammaguide.replay import Replayer
from gammaguide.shapes import MetaRunner

aten = torch.ops.aten

# Architectures of every family the core supports, at small input sizes.
PARITY = [
    "resnet20", "resnet50", "preact_resnet18", "wrn16_4",
    "torchvision:resnet18", "torchvision:mobilenet_v2", "torchvision:efficientnet_b0",
    "torchvision:densenet121", "torchvision:convnext_tiny", "torchvision:vit_b_16", "torchvision:swin_t",
    "timm:resnetv2_50", "timm:vit_tiny_patch16_224", "timm:convnext_tiny", "timm:convnextv2_atto",
    "timm:beit_base_patch16_224", "timm:eva02_tiny_patch14_224", "timm:swinv2_tiny_window8_256",
    "timm:cait_xxs24_224", "timm:levit_128s", "timm:hrnet_w18_small", "timm:mobilenetv3_small_100",
    "hf:bert", "hf:gpt2", "hf:llama",
]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128)
# More Hugging Face families, built from tiny configs: (config class, model class, config keywords).
HF_PARITY = [
    ("T5Config", "T5EncoderModel", dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, vocab_size=128)),
    ("GemmaConfig", "GemmaForCausalLM", dict(TINY, num_key_value_heads=1, head_dim=16)),
    ("Gemma2Config", "Gemma2ForCausalLM", dict(TINY, num_key_value_heads=1, head_dim=16)),
    ("BloomConfig", "BloomForCausalLM", dict(hidden_size=32, n_layer=2, n_head=2, vocab_size=128)),
    ("AlbertConfig", "AlbertModel", dict(TINY, embedding_size=16)),
    ("Qwen3Config", "Qwen3ForCausalLM", dict(TINY, num_key_value_heads=1, head_dim=16)),
]


def report(model, inputs, on_meta):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_report(trace_model(model, inputs, on_meta=on_meta), resolve_policy("guidelines"))


def comparable(r: gg.Report):
    return (
        [(e.param_name, e.role, e.reason, e.decay) for e in r.entries],
        [(a.module_name, a.skip_arg, a.branch_weighted, a.skip_weighted) for a in r.residual_adds],
        [(p.name, p.kind, p.decay) for p in r.params],
        r.warnings,
    )


@pytest.mark.parametrize("spec", PARITY)
def test_meta_pass_gives_what_the_real_pass_gives(spec):
    shape = (1, 3, 64, 64) if spec.startswith("torchvision:") and "vit" not in spec else None
    loaded = specs.load(spec, input_shape=shape)
    default = report(loaded.model, loaded.example_inputs, None)
    real = report(loaded.model, loaded.example_inputs, False)
    assert default.traced_on == "meta" and real.traced_on == "real"
    assert default.entries
    assert comparable(default) == comparable(real)


@pytest.mark.parametrize(("config", "model_class", "kwargs"), HF_PARITY, ids=[m for _, m, _ in HF_PARITY])
def test_meta_pass_gives_what_the_real_pass_gives_on_hugging_face_families(config, model_class, kwargs):
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    model = getattr(transformers, model_class)(getattr(transformers, config)(**kwargs)).eval()
    inputs = {"input_ids": torch.randint(0, 128, (2, 12))}
    default, real = report(model, inputs, None), report(model, inputs, False)
    assert default.traced_on == "meta" and default.entries
    assert comparable(default) == comparable(real)


def test_a_model_zoo_model_that_needs_values_is_traced_for_real():
    """timm's Sequencer runs nn.LSTM, which refuses a meta input with weights on the CPU."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("sequencer2d_s", num_classes=10).eval()
    default, real = report(model, None, None), report(model, None, False)
    assert default.traced_on == "real"
    assert comparable(default) == comparable(real)
    assert {e.role for e in default.entries} == {"residual_last", "head"}


class ValueDependent(nn.Module):
    """Takes a branch by a value, as some models do (``if mask.any():``)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if self.how == "branch" and h.mean() > -1e9:
            h = torch.relu(h)
        elif self.how == "item":
            h = h * (1.0 + 0 * h.abs().max().item())
        elif self.how == "numpy":
            h = h + torch.from_numpy(h.detach().cpu().numpy() * 0)
        return h + self.bn2(self.conv2(h))


@pytest.mark.parametrize("how", ["branch", "item", "numpy"])
def test_a_model_that_needs_values_is_traced_for_real(how, roles):
    r = gg.analyze(ValueDependent(how), torch.randn(2, 3, 8, 8))
    assert r.traced_on == "real"
    assert roles(r) == {"bn.weight": "stream", "bn2.weight": "residual_last"}


def test_default_pass_runs_the_model_on_meta_tensors():
    model = ValueDependent("none")
    seen = []
    model.conv.register_forward_hook(lambda m, i, o: seen.append((i[0].device.type, o.device.type)))
    r = gg.analyze(model, torch.randn(2, 3, 8, 8))
    assert r.traced_on == "meta"
    assert seen == [("meta", "meta")]
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model itself is untouched


def test_forced_real_pass_in_the_fixture_is_real(forward_pass):
    r = gg.analyze(ValueDependent("none"), torch.randn(2, 3, 8, 8))
    assert r.traced_on == ("meta" if forward_pass == "default" else "real")


def test_json_says_how_the_model_was_traced():
    r = gg.analyze(ValueDependent("branch"), torch.randn(2, 3, 8, 8))
    assert '"traced_on": "real"' in r.to_json()


def test_mixed_dtypes_are_sent_to_the_real_pass():
    """A meta convolution accepts a float64 input with float32 weights; a real one refuses."""
    with pytest.raises(gg.GammaGuideError, match="float64"):
        gg.analyze(ValueDependent("none"), torch.randn(2, 3, 8, 8, dtype=torch.float64))
    model = ValueDependent("none").double()
    assert gg.analyze(model, torch.randn(2, 3, 8, 8, dtype=torch.float64)).traced_on == "meta"


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_fast_path_does_not_hide_the_block(norm_first, forward_pass, roles):
    """In eval mode without gradients nn.TransformerEncoderLayer runs as one fused op, norms and
    residual adds inside: tracing switches that path off (and back on afterwards)."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    before = torch.backends.mha.get_fastpath_enabled()
    got = roles(gg.analyze(model, torch.randn(2, 5, 16)))
    assert torch.backends.mha.get_fastpath_enabled() == before
    if norm_first:  # pre-LN: every norm feeds a branch
        assert got == {f"layers.{i}.{n}.weight": "residual_last" for i in range(2) for n in ("norm1", "norm2")}
    else:  # post-LN: every norm is the stream, but the last feeds the output
        expected = {f"layers.{i}.{n}.weight": "stream" for i in range(2) for n in ("norm1", "norm2")}
        expected["layers.1.norm2.weight"] = "head"
        assert got == expected


# ----------------------------------------------------------------------------- the runner


def bn_args(c: int = 4, device: str = "meta"):
    x = torch.empty(2, c, 5, 5, device=device)
    w = torch.empty(c, device=device)
    return (x, w, w, w, w, False, 0.1, 1e-5)


def test_cached_outputs_are_fresh_tensors_with_the_kernels_shapes():
    runner = MetaRunner()
    MetaRunner._cache.clear()
    first = runner(aten.native_batch_norm.default, bn_args(), None)
    assert len(MetaRunner._cache) == 1
    again = runner(aten.native_batch_norm.default, bn_args(), None)
    assert len(MetaRunner._cache) == 1
    assert isinstance(again, tuple) and len(again) == len(first) == 3
    for a, b in zip(first, again, strict=True):
        assert a is not b
        assert (a.shape, a.stride(), a.dtype, a.device.type) == (b.shape, b.stride(), b.dtype, "meta")
    runner(aten.native_batch_norm.default, bn_args(c=6), None)  # another shape: another entry
    assert len(MetaRunner._cache) == 2


def test_real_arguments_get_one_twin_each_and_are_not_written():
    runner = MetaRunner()
    buf = torch.zeros(3)
    out = runner(aten.add_.Tensor, (buf, torch.empty(3, device="meta")), None)
    assert out.is_meta and out is runner.twin(buf)  # an in-place op returns the twin it wrote
    assert torch.equal(buf, torch.zeros(3))


def test_a_cache_hit_makes_no_twins_and_reads_shapes_off_a_reshaped_twin():
    MetaRunner._cache.clear()
    x, weight = torch.empty(2, 4, device="meta"), torch.randn(3, 4)
    MetaRunner()(aten.mm.default, (x, weight.t()), None)  # fills the cache
    runner = MetaRunner()
    assert runner(aten.mm.default, (x, weight.t()), None).shape == (2, 3)
    assert runner.twins == {}  # the hit ran nothing, so the real weight needed no twin
    # Once an op reshaped a twin in place, the key is read off the twin, not the real tensor.
    square = torch.randn(4, 4)
    twin = runner.twin(square)
    twin.resize_(4, 3)
    assert runner(aten.mm.default, (x, square), None).shape == (2, 3)


def test_an_in_place_op_checks_its_arguments_once_per_signature():
    """``add_`` given another tensor returns its target unchanged; its meta kernel only checks that
    the other fits, so a signature that passed once is not run again, and one that fails always fails."""
    MetaRunner._checked.clear()
    runner, ran = MetaRunner(), []
    run = runner._run
    runner._run = lambda *a: ran.append(a[0]) or run(*a)
    x, y = torch.empty(2, 3, device="meta"), torch.empty(3, device="meta")
    assert runner(aten.add_.Tensor, (x, y), None) is x and len(ran) == 1
    assert runner(aten.add_.Tensor, (x, y), None) is x and len(ran) == 1  # checked already: not run
    assert runner(aten.add_.Tensor, (x, torch.empty(2, 1, device="meta")), None) is x and len(ran) == 2
    small, big = torch.empty(3, device="meta"), torch.empty(2, 3, device="meta")
    for _ in range(2):  # it would have to grow its target: fails, and is never recorded as passed
        with pytest.raises(RuntimeError):
            runner(aten.add_.Tensor, (small, big), None)
    assert len(ran) == 4


class MakesTensorsOnItsInputsDevice(nn.Module):
    """Makes tensors from no tensor on the input's device (as BatchNorm does in C++) and checks,
    in its own forward pass, everything a meta tensor has: shape, strides, dtype, device."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        t = torch.empty(2, 3, dtype=torch.float64, device=x.device).t()
        assert t.shape == (3, 2) and t.stride() == (1, 3) and t.dtype == torch.float64 and t.device == x.device
        z = torch.zeros(1, 4, 1, 1, device=x.device)
        assert z.shape == (1, 4, 1, 1) and z.dtype == torch.float32 and z.device == x.device
        return self.bn(self.conv(x)) + z


def test_a_factory_on_meta_comes_from_the_shape_cache_with_the_shape_the_op_gives():
    """On the meta pass a tensor made from no tensor on the meta device is made by the shape cache:
    run once, then rebuilt from its shape, strides and dtype (the model's own asserts would
    send a wrong one to the real pass)."""
    model, x = MakesTensorsOnItsInputsDevice(), torch.randn(1, 3, 4, 4)
    MetaRunner._cache.clear()
    Replayer._cache.clear()  # else a replayed batch norm would make its empty tensor without the op
    first = gg.analyze(model, x, warn=False)
    factories = {k[0] for k in MetaRunner._cache if k[0] in (aten.empty.memory_format, aten.zeros.default)}
    assert factories == {aten.empty.memory_format, aten.zeros.default}
    second = gg.analyze(model, x, warn=False)  # every factory a cache hit now
    assert first.traced_on == second.traced_on == "meta"
    assert first.to_dict() == second.to_dict()
    assert model(x).device.type == "cpu"  # the model still runs for real


def test_views_alias_their_argument_and_bypass_the_cache():
    runner = MetaRunner()
    x = torch.empty(4, 6, device="meta")
    size = len(MetaRunner._cache)
    v = runner(aten.view.default, (x, [24]), None)
    assert v._base is x and len(MetaRunner._cache) == size


def test_an_op_without_a_meta_kernel_raises_so_the_caller_can_run_it_for_real():
    runner = MetaRunner()
    with pytest.raises(NotImplementedError):
        runner(aten.nonzero.default, (torch.empty(5, device="meta"),), None)


def test_errors_only_values_reveal_do_not_stop_the_meta_pass_but_shape_errors_do():
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    r = gg.analyze(model, torch.tensor([[3, 99]]))  # 99 is beyond the table: only a real lookup fails
    assert r.traced_on == "meta" and [e.role for e in r.entries] == ["head"]
    with pytest.raises(gg.GammaGuideError, match=r"float32\[1, 2\].*indices"):  # a dtype error stops both
        gg.analyze(model, torch.tensor([[0.5, 1.5]]))

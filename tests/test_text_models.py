"""The roles of the built-in text transformers, pre-LN and post-LN, derived from where each
LayerNorm sits in the code (independently of the tracer):

- pre-LN: ``x + f(norm(x))``: a block norm opens a branch and reaches the addition through
  linear layers, on the branch side (``residual_last``); the classifier's final norm and the
  decoder's final norm feed the output (``head``); the encoder's final norm is the memory every
  cross-attention reads, on the branch side of the decoder's additions (``residual_last``).
- post-LN: ``norm(x + f(x))``: a norm's output is the next addition's skip input (``stream``),
  so is the embedding norm's; the last norm before the output is ``head``, and the last encoder
  norm (the memory, no final norm in fairseq's post-LN) is ``residual_last``.

Whether ``stream`` is the right decision for post-LN norms by the paper's reasoning is a
separate question (see docs/transformers.md): the tests pin what the analysis says.
"""

from __future__ import annotations

import pytest
import torch

import gammaguide as gg
from gammaguide.cli import main
from gammaguide.models import create_model
from gammaguide.text_models import TEXT_MODELS, list_text_models

pytestmark = pytest.mark.usefixtures("forward_pass")

SMALL = dict(vocab_size=50, max_len=16, width=16, heads=2)


def expected(name: str, layers: int) -> dict[str, str]:
    pre = name.endswith("preln")
    exp: dict[str, str] = {}
    if name.startswith("textcls"):
        stacks = [("layers", ("attn_norm", "ffn_norm"))]
    else:
        stacks = [("encoder", ("attn_norm", "ffn_norm")), ("decoder", ("attn_norm", "cross_norm", "ffn_norm"))]
    for stack, norms in stacks:
        names = [f"{stack}.{i}.{n}.weight" for i in range(layers) for n in norms]
        if pre:
            exp.update({n: "residual_last" for n in names})
        else:
            exp.update({n: "stream" for n in names[:-1]})
            exp[names[-1]] = "residual_last" if stack == "encoder" else "head"
    if name == "textcls_preln":
        exp["final_norm.weight"] = "head"
    if name == "textcls_postln":
        exp["embed_norm.weight"] = "stream"
    if name == "seq2seq_preln":
        exp["encoder_norm.weight"] = "residual_last"
        exp["decoder_norm.weight"] = "head"
    return exp


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("name", list_text_models())
def test_every_layernorm_has_its_structural_role(name, layers, roles):
    model = create_model(name, **SMALL, layers=layers)
    report = gg.analyze(model, model.example_inputs(2, 8))
    norms = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    exp = expected(name, layers)
    assert set(exp) == norms, "the expectation must cover every LayerNorm"
    assert roles(report) == exp
    # every residual addition of the blocks is found: 2 per encoder block, 3 per decoder block
    adds = 2 * layers if name.startswith("textcls") else 5 * layers
    assert len(report.residual_adds) == adds


@pytest.mark.parametrize("name", list_text_models())
def test_guidelines_decay_exactly_the_residual_last_gammas(name):
    model = create_model(name, **SMALL, layers=2)
    report = gg.analyze(model, model.example_inputs(1, 8))
    assert {e.param_name for e in report.entries if e.decay} == \
        {e.param_name for e in report.entries if e.role == "residual_last"}


def test_outputs_and_padding():
    cls = create_model("textcls_postln", num_classes=3, **SMALL, layers=2).eval()
    ids = torch.tensor([[2, 7, 9, 0, 0], [2, 5, 6, 8, 11]])
    assert cls(ids).shape == (2, 3)
    # padding changes nothing: the first sentence scores the same with or without its pads
    assert torch.allclose(cls(ids[:1, :3]), cls(ids[:1]), atol=1e-5)
    s2s = create_model("seq2seq_preln", **SMALL, layers=2).eval()
    src, tgt = torch.tensor([[5, 6, 7, 4, 0]]), torch.tensor([[3, 9, 10]])
    assert s2s(src, tgt).shape == (1, 3, 50)
    # causal: the logits at step 1 do not depend on the token at step 2
    other = tgt.clone()
    other[0, 2] = 12
    assert torch.allclose(s2s(src, tgt)[:, :2], s2s(src, other)[:, :2], atol=1e-5)


def test_create_model_rejects_an_unknown_option():
    with pytest.raises(gg.GammaGuideError, match="cannot build textcls_preln with .*colour"):
        create_model("textcls_preln", colour=3)
    assert set(TEXT_MODELS) == {"textcls_preln", "textcls_postln", "seq2seq_preln", "seq2seq_postln"}


def test_inspect_shows_the_roles(capsys):
    assert main(["inspect", "textcls_preln", "--input-shape", "2,8"]) == 0
    out = capsys.readouterr().out
    assert "int64[2, 8]" in out
    assert "layers.0.attn_norm.weight" in out and "final_norm.weight" in out
    assert "residual_last" in out and "head" in out and "4 γ: 4 decayed" not in out
    assert main(["inspect", "seq2seq_postln", "--json"]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    assert doc["counts"]["stream"] == 13 and doc["counts"]["residual_last"] == 1 and doc["counts"]["head"] == 1
    assert main(["inspect", "textcls_postln", "--input-shape", "1,3,32,32"]) == 2
    assert "(batch, seq_len) of token ids" in capsys.readouterr().err
    assert main(["inspect", "textcls_postln", "--input-shape", "1,500"]) == 2
    assert "longer than this model's 64 positions" in capsys.readouterr().err

"""`gammaguide inspect`: its output, its options, and every error path (one line, exit 2)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import gammaguide as gg
from gammaguide import models
from gammaguide.cli import main

ENTRY_FIELDS = {"param_name", "module_name", "norm_type", "role", "paper_category", "decay", "reason"}

FACTORIES = '''
import torch
from torch import nn

def no_norm():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))

class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        raise ValueError("boom in forward")

def boom():
    return Boom()

class Silent(Boom):
    def forward(self, x):
        self.bn(x)

def silent():
    return Silent()

def raises():
    raise RuntimeError("factory failed")

def not_a_model():
    return 42

NOT_CALLABLE = 3

def sequence_model():
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))

def with_inputs():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    return model, torch.zeros(2, 4)
'''


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    folder = tmp_path_factory.mktemp("specs")
    (folder / "factories.py").write_text(FACTORIES)
    (folder / "broken.py").write_text("def f(:\n")
    return folder


def run(capsys, *argv):
    rc = main(["inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


ERRORS = {
    # bad MODEL
    "unknown built-in": (["nosuchmodel"], "unknown model 'nosuchmodel'"),
    "typo": (["resnt20"], "did you mean resnet20"),
    "unknown source": (["foo:bar"], "unknown model source 'foo'"),
    "empty": ([""], "empty MODEL"),
    "source without name": (["hf:"], "names no model"),
    "unknown torchvision": (["torchvision:resnet9000"], "unknown torchvision model 'resnet9000'"),
    "unknown timm": (["timm:resnet9000"], "unknown timm model 'resnet9000'"),
    "unknown hf": (["hf:bart"], "unknown hf config 'bart'"),
    "hf too big without --meta": (["hf:llama-7b"], "add --meta"),
    "file without factory": (["{dir}/factories.py"], "names a file but no factory"),
    "missing file": (["{dir}/missing.py:f"], "not found"),
    "missing factory": (["{dir}/factories.py:nope"], "has no 'nope'; callables defined there: "),
    "factory raises": (["{dir}/factories.py:raises"], "raised RuntimeError: factory failed"),
    "factory returns no model": (["{dir}/factories.py:not_a_model"], "returned int"),
    "factory not callable": (["{dir}/factories.py:NOT_CALLABLE"], "not a function"),
    "file does not import": (["{dir}/broken.py:f"], "importing"),
    "no input to guess": (["{dir}/factories.py:sequence_model"], "cannot guess an input"),
    # bad shape
    "shape not integers": (["resnet20", "--input-shape", "1,3,x"], "bad --input-shape '1,3,x'"),
    "shape with zero": (["resnet20", "--input-shape", "0,3,32,32"], "bad --input-shape"),
    "empty shape": (["resnet20", "--input-shape", ""], "bad --input-shape"),
    "hf shape rank": (["hf:bert", "--input-shape", "1,3,32,32"], "(batch, seq_len)"),
    "hf sequence too long": (["hf:bert", "--input-shape", "1,100000"], "longer than this model's"),
    # no normalization layers
    "no norms": (["{dir}/factories.py:no_norm"], "has no normalization layers"),
    # forward raising
    "wrong channels": (["resnet20", "--input-shape", "1,5,32,32"], "forward pass of ResNet failed"),
    "forward raises": (["{dir}/factories.py:boom", "--input-shape", "1,3,4,4"], "ValueError: boom in forward"),
    "forward returns nothing": (["{dir}/factories.py:silent", "--input-shape", "1,3,4,4"], "returned no tensor"),
    # bad policy
    "bad policy": (["resnet20", "--policy", "bogus"], "unknown policy 'bogus'"),
    "bad only: policy": (["resnet20", "--policy", "only:bogus"], "unknown policy 'only:bogus'"),
    # bad --num-classes
    "zero classes": (["resnet20", "--num-classes", "0"], "bad --num-classes '0'"),
    "negative classes": (["resnet20", "--num-classes", "-3"], "bad --num-classes '-3'"),
    "text classes": (["resnet20", "--num-classes", "ten"], "bad --num-classes 'ten'"),
    "fractional classes": (["resnet20", "--num-classes", "1.5"], "bad --num-classes '1.5'"),
    "classes for a language model": (["hf:gpt2", "--num-classes", "3"], "does not apply"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_paths(case, capsys, factories):
    argv, expected = ERRORS[case]
    rc, out, err = run(capsys, *(a.format(dir=factories) for a in argv))
    assert rc == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("gammaguide: error: ")
    assert "Traceback" not in err
    assert expected in err


def overview(out: str) -> dict[str, tuple[int, str]]:
    """role -> (count, decision) from the table's overview rows."""
    rows = re.findall(r"^\s*(\w+)\s+(?:γ_\w+|-)\s+(\d+)\s+(decay|no decay|mixed)\s*$", out, re.M)
    return {role: (int(n), verdict) for role, n, verdict in rows}


def test_table_for_a_builtin(capsys):
    rc, out, err = run(capsys, "resnet20")
    assert rc == 0 and err == ""
    report = gg.analyze(models.create_model("resnet20"))
    want = {r: (n, "decay" if r in ("residual_last", "scale_invariant") else "no decay")
            for r, n in report.counts().items() if n}
    assert overview(out) == want
    for e in report.entries:
        assert e.param_name in out
    assert f"{len(report.entries)} γ" in out
    assert "traced on meta tensors" in out.splitlines()[0]


def test_json_document(capsys):
    rc, out, _ = run(capsys, "resnet20", "--json", "--input-shape", "2,3,32,32")
    assert rc == 0
    doc = json.loads(out)
    assert doc["model"] == "resnet20" and doc["policy"] == "guidelines" and doc["meta"] is False
    assert doc["input_shapes"] == ["args[0]: float32[2, 3, 32, 32]"]
    assert doc["traced_on"] == "meta"
    report = gg.analyze(models.create_model("resnet20"), torch.zeros(2, 3, 32, 32))
    assert [set(e) for e in doc["entries"]] == [ENTRY_FIELDS] * len(report.entries)
    assert [(e["param_name"], e["role"], e["decay"]) for e in doc["entries"]] == [
        (e.param_name, e.role, e.decay) for e in report.entries]
    assert doc["counts"] == report.counts()


@pytest.mark.parametrize("policy", ["no_norm", "all", "only:stream"])
def test_policy_option(policy, capsys):
    rc, out, _ = run(capsys, "resnet20", "--json", "--policy", policy)
    assert rc == 0
    doc = json.loads(out)
    assert doc["policy"] == policy
    for e in doc["entries"]:
        assert e["decay"] == (policy == "all" or (policy == "only:stream" and e["role"] == "stream"))


def test_num_classes_option(capsys):
    rc, out, _ = run(capsys, "resnet20", "--json", "--num-classes", "7")
    assert rc == 0
    shapes = {p["name"]: p["shape"] for p in json.loads(out)["params"]}
    assert shapes["fc.weight"] == [7, models.create_model("resnet20").fc.in_features]


def test_meta_option_on_a_7b_model(capsys):
    rc, out, _ = run(capsys, "hf:llama-7b", "--meta", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["meta"] is True
    assert len(doc["entries"]) == 65 == 2 * 32 + 1  # two RMSNorms in each of 32 layers, one final
    assert {e["norm_type"] for e in doc["entries"]} == {"LlamaRMSNorm"}


@pytest.mark.parametrize("spec, shape, param, role", [
    ("torchvision:resnet18", "1,3,64,64", "bn1.weight", "stream"),
    ("torchvision:resnet50", "1,3,64,64", "bn1.weight", "scale_invariant"),
    ("timm:resnet18", "1,3,64,64", "bn1.weight", "stream"),
    ("hf:bert", "1,8", "bert.embeddings.LayerNorm.weight", "stream"),
    ("hf:gpt2", None, "transformer.ln_f.weight", "head"),
    ("hf:llama", None, "model.layers.0.input_layernorm.weight", "residual_last"),
])
def test_model_sources(spec, shape, param, role, capsys):
    argv = [spec, "--json"] + (["--input-shape", shape] if shape else [])
    rc, out, err = run(capsys, *argv)
    assert rc == 0 and err == ""
    roles = {e["param_name"]: e["role"] for e in json.loads(out)["entries"]}
    assert roles[param] == role


def test_factory_file_with_its_own_inputs(capsys, factories):
    rc, out, _ = run(capsys, f"{factories}/factories.py:with_inputs", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["input_shapes"] == ["args[0]: float32[2, 4]"]
    assert [(e["param_name"], e["role"]) for e in doc["entries"]] == [("1.weight", "head")]
    rc, out, _ = run(capsys, f"{factories}/factories.py:with_inputs", "--json", "--input-shape", "3,4")
    assert json.loads(out)["input_shapes"] == ["args[0]: float32[3, 4]"]


def inspect_subprocess(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see conftest: no thread contention
    return subprocess.run([sys.executable, "-m", "gammaguide", "inspect", *argv],
                          capture_output=True, text=True, timeout=120, env=env)


def test_real_subprocess():
    ok = inspect_subprocess("resnet20", "--json")
    assert ok.returncode == 0, ok.stderr
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in models.create_model("resnet20").modules())
    assert len(json.loads(ok.stdout)["entries"]) == bns
    bad = inspect_subprocess("resnet20", "--input-shape", "1,3,x")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("gammaguide: error: bad --input-shape")

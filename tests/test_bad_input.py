"""Bad input (issue 9, §6): the library raises GammaGuideError naming the value and what to pass; the
command line prints one line on stderr and exits with status 2, before any work is lost; results
files with bad lines are read with one warning line."""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
from torch import nn

import gammaguide as gg
from gammaguide.cli import main
from gammaguide.experiments import results as R
from gammaguide.models import create_model

X = torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet20():
    return create_model("resnet20")


@pytest.fixture(scope="module")
def report20(resnet20):
    return gg.analyze(resnet20, X)


# ----------------------------------------------------------------------------- library


@pytest.mark.parametrize("value, shown", [
    (float("nan"), "nan"), (float("inf"), "inf"), (True, "True"), (-1e-4, "-0.0001"), ("5e-4", "'5e-4'"),
])
def test_weight_decay_must_be_a_finite_number(resnet20, report20, value, shown):
    with pytest.raises(gg.GammaGuideError, match=rf"weight_decay must be a finite number >= 0, got {shown}; "
                                                 r"pass e\.g\. weight_decay=5e-4"):
        gg.param_groups(resnet20, value, report=report20)


@pytest.mark.parametrize("value, shown", [(float("nan"), "nan"), (-0.1, "-0.1"), (False, "False")])
def test_lr_must_be_a_finite_number(resnet20, report20, value, shown):
    with pytest.raises(gg.GammaGuideError, match=rf"lr must be a finite number >= 0, got {shown}; pass e\.g\. lr=0.1"):
        gg.param_groups(resnet20, 5e-4, report=report20, lr=value)


@pytest.mark.parametrize("scales, message", [
    ({"stream": float("nan")}, r"lr_scale\['stream'\] must be a finite number >= 0, got nan"),
    ({"stream": -1.0}, r"lr_scale\['stream'\] must be a finite number >= 0, got -1.0"),
    ({"stream": "2"}, r"lr_scale\['stream'\] must be a finite number >= 0, got '2'"),
    ({"stream": None}, r"lr_scale\['stream'\] must be a finite number >= 0, got None"),
    ([("stream", 2.0)], r"lr_scale must be a mapping from role to a learning-rate factor, got list"),
    ({"gamma": 2.0}, r"lr_scale has unknown role\(s\) \['gamma'\]"),
])
def test_lr_scale_values(resnet20, report20, scales, message):
    with pytest.raises(gg.GammaGuideError, match=message):
        gg.param_groups(resnet20, 5e-4, report=report20, lr_scale=scales)


def test_good_rates_still_pass(resnet20, report20):
    groups = gg.param_groups(resnet20, 0, report=report20, lr=0.0, lr_scale={"stream": 0.0, "shortcut": 2})
    assert {g["weight_decay"] for g in groups} == {0} and {g.get("lr_scale") for g in groups} == {None, 0.0, 2.0}


@pytest.mark.parametrize("policy, shown", [
    ({"stream": "no"}, "'stream' the value 'no'"), ({"stream": 1}, "'stream' the value 1"),
    ({"residual_last": True, "shortcut": None}, "'shortcut' the value None"),
])
def test_policy_mapping_values_must_be_bools(resnet20, policy, shown):
    with pytest.raises(gg.GammaGuideError, match=f"policy mapping gives {shown}; map each role to True"):
        gg.analyze(resnet20, X, policy)
    with pytest.raises(gg.GammaGuideError, match=shown):
        gg.param_groups(resnet20, 5e-4, X, policy)


def test_decay_bias_and_beta_must_be_bools(resnet20):
    with pytest.raises(gg.GammaGuideError, match="decay_bias must be True, False or None .* got 'yes'"):
        gg.param_groups(resnet20, 5e-4, X, decay_bias="yes")


def test_report_of_the_wrong_type(resnet20, report20):
    for bad in ("report", report20.to_dict()):
        with pytest.raises(gg.GammaGuideError, match=f"report must be a gammaguide.Report, got {type(bad).__name__}"):
            gg.param_groups(resnet20, 5e-4, report=bad)


def test_report_made_from_another_model(resnet20, report20):
    other = create_model("resnet32")
    with pytest.raises(gg.GammaGuideError, match=r"report was made from another model \(it lacks the model's "
                                                 r"'layers.0.3.conv1.weight', .* and \d+ more\); pass report="):
        gg.param_groups(other, 5e-4, report=report20)
    smaller = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16))
    with pytest.raises(gg.GammaGuideError, match=r"it lacks the model's '0.weight', '0.bias', '1.weight' and 1 more; "
                                                 r"it has 'conv1.weight', 'bn1.weight', 'bn1.bias' and 62 more, which "
                                                 r"the model lacks"):
        gg.param_groups(smaller, 5e-4, report=report20)
    # Another instance of the same architecture is the same model, parameter for parameter.
    twin = create_model("resnet20")
    assert len(gg.param_groups(twin, 5e-4, report=report20)) == 2


def test_meta_inputs_for_a_model_with_real_weights(resnet20):
    with pytest.raises(gg.GammaGuideError, match=r"example_inputs \(args\[0\]: float32\[2, 3, 32, 32\]\) are on the "
                                                 r"meta device but the model's parameters are on cpu; pass real"):
        gg.analyze(resnet20, X.to("meta"))
    with pytest.raises(gg.GammaGuideError, match="meta device"):
        gg.param_groups(resnet20, 5e-4, {"x": X.to("meta")})


def test_skip_list_of_the_wrong_type(resnet20):
    with pytest.raises(gg.GammaGuideError, match="skip_list must be a list of parameter names, got the string 'fc'"):
        gg.param_groups(resnet20, 5e-4, X, skip_list="fc")


# ----------------------------------------------------------------------------- results files


def _run(arm: str, seed: int, acc: float | None, status: str = "ok", **extra) -> dict:
    return {"key": f"{arm}{seed}", "arm": arm, "seed": seed, "status": status, "test_acc": acc,
            "settings": {"model": "resnet20", "data": "d", "policy": arm, "seed": seed}, "history": [], **extra}


def test_corrupt_lines_give_one_warning_that_counts_and_locates_them(tmp_path):
    path = tmp_path / "results.jsonl"
    lines = [json.dumps(_run("no_gamma", 0, 0.8))] + ["{broken"] * 3 + [json.dumps(_run("all", 0, 0.7)), "[1, 2]",
                                                                         '"text"', json.dumps(_run("all", 1, 0.6))]
    path.write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        records = R.read_lines(path)
    assert [r["key"] for r in records] == ["no_gamma0", "all0", "all1"]
    assert [str(w.message) for w in record] == [
        f"5 unreadable results lines skipped: {path}: lines 2-4, 6-7 (corrupt or truncated); the other lines are kept"]


def test_schema_versions(tmp_path):
    path = tmp_path / "results.jsonl"
    runs = [_run("no_gamma", 0, 0.8), _run("all", 0, 0.7, schema=1), _run("all", 1, 0.6, schema=2),
            _run("all", 2, 0.5, schema="1")]
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    with pytest.warns(UserWarning) as record:
        records = R.read_lines(path)
    assert [r["key"] for r in records] == ["no_gamma0", "all0"]  # no field: version 1
    assert len(record) == 1 and str(record[0].message) == (
        f"2 unreadable results lines skipped: {path}: line 3 (schema version 2, unknown to this gammaguide); "
        f"{path}: line 4 (schema version '1', unknown to this gammaguide); the other lines are kept")


def test_every_new_record_says_its_schema():
    from gammaguide.experiments.config import TrainConfig
    from gammaguide.experiments.trainer import failed_record

    record = failed_record(TrainConfig(), "why").to_json()
    assert record["schema"] == R.SCHEMA == 1 and R.SCHEMA in R.READABLE_SCHEMAS


# ----------------------------------------------------------------------------- command line


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err.strip()


def one_error_line(err: str, *parts: str) -> None:
    assert len(err.splitlines()) == 1 and err.startswith("gammaguide: error:"), err
    for part in parts:
        assert part in err, (part, err)


def _read_only(path, monkeypatch) -> None:
    """A folder this process cannot write into: by its mode, and, for root (whom modes do not stop),
    as the operating system would answer the access check."""
    path.mkdir(exist_ok=True)
    path.chmod(0o555)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.samefile(p, path) and mode & os.W_OK
                        else real_access(p, mode, **kw))


@pytest.mark.parametrize("command", [
    ["train", "--data", "cifar10"], ["ablate", "--data", "cifar10"], ["report", "RESULTS"]])
@pytest.mark.parametrize("target", ["file", "read-only folder", "below a file"])
def test_out_must_be_a_writable_folder(command, target, tmp_path, capsys, monkeypatch):
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(_run("all", 0, 0.5)) + "\n")
    command = [str(results) if c == "RESULTS" else c for c in command]
    if target == "file":
        out = tmp_path / "taken"
        out.write_text("a file")
        expect = "is a file, not a folder"
    elif target == "below a file":
        (tmp_path / "taken").write_text("a file")
        out = tmp_path / "taken" / "runs"
        expect = "is a file, not a folder"
    else:
        out = tmp_path / "locked"
        _read_only(out, monkeypatch)
        expect = "is not writable"
    code, _, err = run_cli([*command, "--out", str(out)], capsys)
    assert code == 2
    one_error_line(err, f"--out '{out}'", expect, "e.g. --out runs/demo")
    assert results.read_text() == json.dumps(_run("all", 0, 0.5)) + "\n"  # nothing lost


@pytest.mark.parametrize("flag, value", [("--seeds", ""), ("--arms", ""), ("--arms", " , "), ("--seeds", ",")])
def test_empty_lists_are_errors_not_the_defaults(flag, value, tmp_path, capsys):
    code, _, err = run_cli(["ablate", "--data", "cifar10", flag, value, "--out", str(tmp_path)], capsys)
    assert code == 2
    one_error_line(err, f"{flag} {value!r} names nothing")
    assert not any(tmp_path.iterdir())


def test_report_without_a_usable_run(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(_run("all", 0, None, status="failed")) + "\n{broken\n")
    code, _, err = run_cli(["report", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    one_error_line(err, "holds no usable run: 1 records, 1 of them failed runs; 1 unreadable results line skipped: ",
                   "line 2 (corrupt or truncated)")
    assert not (tmp_path / "out").exists()


def test_report_warns_about_bad_lines_in_one_line(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(_run(a, s, 0.5 + s / 10)) + "\n" for a in ("no_gamma", "all") for s in (0, 1))
                    + "{broken\n" * 2)
    code, out, err = run_cli(["report", str(path), "--out", str(tmp_path / "out"), "--no-plots"], capsys)
    assert code == 0 and out.strip().endswith("report.md")
    assert err.splitlines() == [f"gammaguide: warning: 2 unreadable results lines skipped: {path}: lines 5-6 "
                                f"(corrupt or truncated); the other lines are kept"]


def test_absurd_input_shape_is_analyzed_on_shapes_alone(capsys):
    code, out, err = run_cli(["inspect", "resnet20", "--input-shape", "100000,3,32000,32000", "--json"], capsys)
    assert code == 0
    assert err.startswith("gammaguide: note: an input of shape 100000,3,32000,32000 would take 2.2 PiB; building "
                          "the model and its input on the meta device") and len(err.splitlines()) == 1
    doc = json.loads(out)
    assert doc["meta"] is True and doc["traced_on"] == "meta" and doc["counts"]["residual_last"] == 9
    assert doc["input_shapes"] == ["args[0]: float32[100000, 3, 32000, 32000]"]


def test_a_torchvision_detection_model_downloads_nothing(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    from gammaguide import specs

    calls = []

    def no_download(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", no_download)
    loaded = specs.load("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn")
    assert calls == []
    assert type(loaded.model).__name__ == "FasterRCNN" and not math.isnan(float(loaded.example_inputs.sum()))
    # The backbone is the plain architecture: BatchNorm2d, not the frozen one of pretrained weights.
    assert any(isinstance(m, nn.BatchNorm2d) for m in loaded.model.backbone.modules())


def test_skip_list_applies_on_top_of_a_given_report(resnet20, report20):
    groups = gg.param_groups(resnet20, 5e-4, report=report20, skip_list=("fc.weight",))
    (group,) = [g for g in groups if any(p is resnet20.fc.weight for p in g["params"])]
    assert group["weight_decay"] == 0.0
    with pytest.raises(gg.GammaGuideError, match="decay_bias and decay_beta are decided when the report is made"):
        gg.param_groups(resnet20, 5e-4, report=report20, decay_beta=True)


def test_zero_init_with_a_report_of_another_model(report20):
    other = create_model("resnet32")
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(gg.GammaGuideError, match="report was made from another model"):
        gg.zero_init(other, report=report20)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))

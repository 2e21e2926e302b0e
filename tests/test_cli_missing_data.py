"""A data tree that is not there: `gammaguide ablate` says so in one line (exit 2) before printing
any header or doing any work, for image, zip and text specs alike."""

from __future__ import annotations

import pytest

from gammaguide.cli import main


@pytest.mark.parametrize("protocol, spec, says", [
    ("smoke", "imagefolder:{tmp}/nothing", "no ImageFolder tree"),
    ("cifar100-d1", "cifar100:{tmp}/nothing", "no ImageFolder tree"),
    ("sst2-smoke", "sst2:{tmp}/nothing", "no sst2 data found"),
    ("multi30k-smoke", "multi30k:{tmp}/nothing", "no multi30k data found"),
])
def test_missing_data_is_one_line_before_any_header(protocol, spec, says, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GAMMAGUIDE_DATA", raising=False)
    out = tmp_path / "out"
    assert main(["ablate", "--protocol", protocol, "--data", spec.format(tmp=tmp_path), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], lines
    assert not out.exists()  # no work done, nothing written

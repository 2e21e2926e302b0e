"""docs/transformers.md's table of norm roles is what `gammaguide inspect` says today."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_roles_table_is_the_scripts_output():
    import pytest

    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("transformer_roles", ROOT / "scripts" / "transformer_roles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert module.main() == 0
    table = out.getvalue().strip()
    assert table.count("\n") > 20
    assert table in (ROOT / "docs" / "transformers.md").read_text(), \
        "regenerate the table with: python scripts/transformer_roles.py"

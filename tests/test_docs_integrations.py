"""Every Python block of docs/README-integrations.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "README-integrations.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
OPTIONAL = ("timm", "transformers", "lightning", "torchvision")


def test_the_document_has_snippets():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_snippet_runs(code, tmp_path, monkeypatch):
    for module in OPTIONAL:
        if re.search(rf"^(import|from) {module}\b", code, flags=re.M):
            pytest.importorskip(module)
    if "TrainingArguments" in code:
        pytest.importorskip("accelerate")  # the Trainer's own dependency
    monkeypatch.chdir(tmp_path)  # anything a snippet writes lands here
    exec(compile(code, str(DOC), "exec"), {"__name__": "__doc_snippet__"})

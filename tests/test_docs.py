"""Every Python block of the README and of docs/*.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "core.md", ROOT / "docs" / "integrations.md", ROOT / "docs" / "fused.md",
        ROOT / "docs" / "transformers.md"]
BLOCKS = [(doc, code) for doc in DOCS for code in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)]
OPTIONAL = ("timm", "transformers", "lightning", "torchvision")


def test_the_documents_have_snippets():
    for doc in DOCS:
        assert any(d == doc for d, _ in BLOCKS), f"{doc.name} has no python block"


@pytest.mark.parametrize("doc, code", BLOCKS, ids=[f"{d.stem}-{i}" for i, (d, _) in enumerate(BLOCKS)])
def test_snippet_runs(doc, code, tmp_path, monkeypatch):
    for module in OPTIONAL:
        if re.search(rf"^(import|from) {module}\b", code, flags=re.M) or f"import torch, {module}" in code:
            pytest.importorskip(module)
    if "TrainingArguments" in code:
        pytest.importorskip("accelerate")  # the Trainer's own dependency
    monkeypatch.chdir(tmp_path)  # anything a snippet writes lands here
    exec(compile(code, str(doc), "exec"), {"__name__": "__doc_snippet__"})

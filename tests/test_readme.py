"""The README's two set-up commands are the ones CI and users run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("python3 -m venv .venv && ")]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = _commands((ROOT / "README.md").read_text())
    assert len(readme) == 2, "the README has exactly two set-up commands near its top"
    ci = _commands((ROOT / ".ci" / "run").read_text())
    assert ci == [readme[1]] and readme[1].endswith("python -m pytest -q")
    assert readme[0].endswith("gammaguide inspect resnet20")

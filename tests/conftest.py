"""Shared fixtures for the test suite: deterministic, CPU only, no network."""

from __future__ import annotations

import pytest
import torch

# The test models are tiny; on a small shared machine several OpenMP threads per process spin
# against each other (a resnet20 forward went from ~10 ms to seconds). One thread is faster here.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so failures reproduce."""
    torch.manual_seed(0)
    yield


def roles_of(report) -> dict[str, str]:
    """γ parameter name -> role, for comparing a report with an expectation."""
    return {e.param_name: e.role for e in report.entries}


@pytest.fixture
def roles():
    return roles_of


@pytest.fixture(params=["default", "real"])
def forward_pass(request, monkeypatch):
    """Run a test with analyze's default pass (on meta tensors, or for real when the model needs
    values) and again with the real pass forced, which models that need values take: both must
    give the same answers. Use it with ``pytestmark = pytest.mark.usefixtures("forward_pass")``."""
    if request.param == "real":
        from gammaguide import analysis

        monkeypatch.setitem(analysis.trace_model.__kwdefaults__, "on_meta", False)
    return request.param


# ----------------------------------------------------------------------------- experiments


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A tiny ImageFolder tree (8 training and 3 test images per class), made once per test module."""
    from experiment_helpers import make_imagefolder

    return make_imagefolder(tmp_path_factory.mktemp("data") / "tree", per_class=8, test_per_class=3)


@pytest.fixture
def dataset_cache(tmp_path_factory, monkeypatch):
    """Decoded datasets are cached in the session's temporary folder, never in the user's cache.
    Use it with ``pytestmark = pytest.mark.usefixtures("dataset_cache")``."""
    from gammaguide.experiments import data

    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "cache"))

"""Test set-up: the Triton interpreter on CPU-only machines, NaN-poisoned allocations, hypothesis profiles."""

import os

import torch

if not torch.cuda.is_available():  # must happen before `optimized` (and triton.jit) is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "dev", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "gpu-quick", max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "gpu", max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
if "HYPOTHESIS_PROFILE" in os.environ:
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
elif not os.environ.get("CI"):  # under CI hypothesis loads its built-in, derandomized `ci` profile
    settings.load_profile("dev")

# The tests' shapes are tiny: one intra-op thread beats thread hand-offs by several times on 2 cores.
torch.set_num_threads(1)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

# NSA_RECORD_LAUNCHES=<file>: record every interpreted kernel launch for scripts/compile_check.py (make test)
RECORD_LAUNCHES = os.environ.get("NSA_RECORD_LAUNCHES") if os.environ.get("TRITON_INTERPRET") == "1" else None
if RECORD_LAUNCHES:
    import launch_recorder

    launch_recorder.install()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if RECORD_LAUNCHES:
        launch_recorder.dump(RECORD_LAUNCHES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make test-gpu)")
    for item in items:
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(skip)


_empty, _empty_like = torch.empty, torch.empty_like


def _poison(x: torch.Tensor) -> torch.Tensor:
    if x.is_floating_point():
        return x.fill_(float("nan"))
    if x.dtype in (torch.int32, torch.int64):
        return x.fill_(-(2**30))
    return x


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``torch.empty*`` allocation starts as NaN (or a huge negative int), so unwritten outputs fail."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_empty_like(*a, **k)))

"""The soak and fault suite (bench/soak.py) at a small size: a real `whale serve` subprocess on the default model
under seeded mixed traffic at concurrency 32 (valid requests on every route, invalid ones, clients that
disconnect, give up or read slowly), one test per pass criterion. `python bench/soak.py` is the long run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import soak  # noqa: E402


@pytest.fixture(scope="module")
def report() -> soak.SoakReport:
    result = soak.run_soak(requests=96, concurrency=32, seed=0, time_limit_s=120, settle_s=5)
    print(result.render())
    return result


@pytest.mark.parametrize("key", soak.CRITERIA)
def test_soak_criterion(report: soak.SoakReport, key: str) -> None:
    if not report.criterion(key).passed:
        pytest.fail(report.explain(key), pytrace=False)

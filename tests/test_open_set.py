"""Open-set rejection (issue 25, point 4): pictures of classes a pets network never saw (ants/bees photos,
CIFAR-10 airplanes, ships and trucks) are mostly answered "unknown" at a cut that keeps most pets.
The measurement is benchmarks/open_set.py's; here on a small real setting."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, shared_dataset

sys.path.insert(0, str(ROOT / "benchmarks"))
import open_set  # noqa: E402


def test_auroc_and_the_cut():
    assert open_set.auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert open_set.auroc(np.array([1.0]), np.array([1.0])) == 0.5
    val = np.arange(100, dtype=float)
    assert (val >= open_set.cut_keeping(val, 0.9)).mean() == pytest.approx(0.9)


@pytest.mark.slow
def test_unknown_pictures_are_mostly_rejected_at_a_cut_keeping_most_pets(tmp_path: Path):
    for name in ("pets", "cifar10", "hymenoptera"):
        shared_dataset(name)  # skips when ../shared/data is absent
    checkpoint = open_set.train_small(tmp_path, per_class=100)
    result = open_set.measure(str(checkpoint), per_class=100, per_set=90)
    row = {(r["score"], r["keep_val"]): r for r in result["rows"]}
    calibrated = row["calibrated", 0.90]  # what --reject-below compares
    assert calibrated["known_kept"] >= 0.8 and calibrated["kept_acc"] >= result["known_test_acc"]
    assert calibrated["unknown_rejected"] > 0.5
    assert row["knn", 0.90]["unknown_rejected"] > 0.9 and row["knn", 0.90]["auroc"] > 0.95

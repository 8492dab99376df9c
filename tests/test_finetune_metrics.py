"""Finetune metrics against scipy (when installed) and hand-computed values."""
import numpy as np
import pytest

from megagpt.errors import MegaGPTError
from megagpt.finetune import metrics as M


def test_accuracy_f1_by_hand():
    p, y = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert M.accuracy(p, y) == 3 / 5
    assert M.f1(p, y) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))   # tp 2, fp 1, fn 1
    assert M.f1([0, 0], [1, 1]) == 0.0
    with pytest.raises(MegaGPTError):
        M.accuracy([1, 0], [1])


def test_correlations_by_hand():
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = 1,2,3,4 ; y = 1,3,2,4: cov = 4/... → r = 0.8 (sum dx*dy = 4, sum dx^2 = sum dy^2 = 5)
    assert M.pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert M.rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert M.spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)   # monotone, not linear
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.normal(size=200)
        y = x + rng.normal(size=200)
        yt = np.round(y * 2) / 2     # many ties
        assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
        assert M.spearman(x, yt) == pytest.approx(stats.spearmanr(x, yt)[0], abs=1e-12)
        np.testing.assert_allclose(M.rankdata(yt), stats.rankdata(yt))


def test_compute_kinds():
    assert set(M.compute("accuracy_f1", np.array([1, 0]), np.array([1, 1]))) == {"accuracy", "f1"}
    assert set(M.compute("correlation", np.array([1.0, 2.0]), np.array([1.0, 3.0]))) == {"pearson", "spearman"}
    with pytest.raises(MegaGPTError):
        M.compute("bleu", [1], [1])

"""Temperature scaling, ECE / reliability bins, risk–coverage and the calibration plots."""

from __future__ import annotations

import numpy as np
import pytest

from cellclf.errors import CellclfError
from cellclf.gate.temperature import (
    CalibrationError,
    calibration_report,
    ece,
    fit_temperature,
    log_softmax,
    reliability_bins,
    risk_coverage,
    softmax,
    temperature_objective,
)

# Six two-class cells, 5 bins (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]:
#   conf .55 wrong, .58 right   -> bin 2: mean conf .565, acc .5, gap .065
#   conf .70 right, .65 right   -> bin 3: mean conf .675, acc 1,  gap .325
#   conf .90 right, .85 wrong   -> bin 4: mean conf .875, acc .5, gap .375
# ECE = (2·.065 + 2·.325 + 2·.375) / 6 = 1.53 / 6 = 0.255
PROBS6 = np.array([[0.55, 0.45], [0.42, 0.58], [0.30, 0.70], [0.35, 0.65], [0.90, 0.10],
                   [0.85, 0.15]])
LABELS6 = np.array([1, 1, 1, 1, 0, 1])


def test_ece_hand_computed() -> None:
    assert ece(PROBS6, LABELS6, n_bins=5) == pytest.approx(1.53 / 6, abs=1e-12)
    bins = reliability_bins(PROBS6, LABELS6, n_bins=5)
    np.testing.assert_array_equal(bins.count, [0, 0, 2, 2, 2])
    np.testing.assert_allclose(bins.confidence[2:], [0.565, 0.675, 0.875])
    np.testing.assert_allclose(bins.accuracy[2:], [0.5, 1.0, 0.5])
    assert np.isnan(bins.accuracy[0]) and np.isnan(bins.confidence[1])
    assert bins.to_dict()["count"] == [0, 0, 2, 2, 2]


def test_bins_are_right_closed() -> None:
    # Two bins [0, .5] and (.5, 1]: confidence exactly .5 belongs to the first.
    bins = reliability_bins(np.array([[0.5, 0.5], [0.6, 0.4]]), np.array([0, 0]), n_bins=2)
    np.testing.assert_array_equal(bins.count, [1, 1])


def test_perfectly_calibrated_simulation_has_small_ece() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet([0.5, 0.5, 0.5], size=40_000)
    y = (rng.random(len(p))[:, None] > np.cumsum(p, axis=1)).sum(axis=1)  # y ~ p
    assert ece(p, y) < 0.01
    assert ece(np.eye(3)[(y + 1) % 3] * 0.98 + 0.02 / 3, y) > 0.9  # confidently wrong


def test_softmax_is_stable_and_tempered() -> None:
    z = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])
    p = softmax(z)
    assert np.all(np.isfinite(p)) and np.allclose(p.sum(axis=1), 1.0)
    assert p[0, 0] == pytest.approx(1.0)
    np.testing.assert_allclose(softmax(z[1:], 2.0)[0], np.exp([0.5, 1, 1.5]) / np.exp(
        [0.5, 1, 1.5]).sum())
    np.testing.assert_allclose(np.exp(log_softmax(z)), p)
    with pytest.raises(CalibrationError):
        softmax(z, 0.0)


def test_temperature_gradient_matches_finite_difference() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, size=(200, 4))
    y = rng.integers(0, 4, size=200)
    for s in (-0.7, 0.0, 0.9):
        _, g = temperature_objective(s, z, y)
        h = 1e-6
        fd = (temperature_objective(s + h, z, y)[0] - temperature_objective(s - h, z, y)[0]) / (
            2 * h)
        assert g == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_fit_temperature_recovers_known_t() -> None:
    # Labels drawn from softmax(z / 2.5): the NLL minimiser is a consistent estimator of 2.5.
    # With n = 20 000 its standard error is ≈ 1 %; we allow 5 %.
    rng = np.random.default_rng(2)
    t_true = 2.5
    z = rng.normal(0, 4.0, size=(20_000, 4))
    p = softmax(z, t_true)
    y = (rng.random(len(p))[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    t_hat = fit_temperature(z, y)
    assert t_hat == pytest.approx(t_true, rel=0.05)
    rep = calibration_report(z, y, t_hat)
    assert rep["nll_after"] < rep["nll_before"] and rep["ece_after"] < rep["ece_before"]
    assert rep["ece_after"] < 0.02


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "N = 0"),
        (np.zeros((4, 3)), np.array([0, 1, 3, 0]), "value 3 at index 2"),
        (np.zeros((4, 3)), np.array([0, 1, -1, 0]), "outside"),
        (np.zeros((4, 3)), np.array([0, 1, 2]), "shape"),
        (np.zeros(4), np.array([0, 1, 2, 0]), r"\(N, K\)"),
        (np.array([[np.nan, 0.0], [0.0, 1.0]]), np.array([0, 1]), "NaN"),
        (np.zeros((2, 3)), np.array([0.5, 1.0]), "integer"),
    ],
)
def test_fit_temperature_refuses_bad_input(logits: np.ndarray, labels: np.ndarray,
                                           match: str) -> None:
    with pytest.raises(CalibrationError, match=match) as info:
        fit_temperature(logits, labels)
    assert isinstance(info.value, CellclfError)


def test_ece_refuses_logits() -> None:
    with pytest.raises(CalibrationError, match="probabilities"):
        ece(np.array([[2.0, -1.0]]), np.array([0]))


def test_risk_coverage_hand_computed() -> None:
    # conf .9 right, .8 wrong, .8 right, .6 wrong → the tie at .8 collapses to one point.
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.2], [0.6, 0.4]])
    y = np.array([0, 0, 0, 1])
    rc = risk_coverage(p, y)
    np.testing.assert_allclose(rc.coverage, [0.25, 0.75, 1.0])
    np.testing.assert_allclose(rc.risk, [0.0, 1 / 3, 0.5])
    np.testing.assert_allclose(rc.threshold, [0.9, 0.8, 0.6])
    assert rc.aurc == pytest.approx(0.5 / 3 + 0.25 * 0.5)


def test_plots_write_pngs(tmp_path) -> None:
    from PIL import Image

    from cellclf.outputs.plots import plot_reliability, plot_risk_coverage

    rng = np.random.default_rng(3)
    z = rng.normal(0, 4, size=(2000, 4))
    y = (rng.random(2000)[:, None] > np.cumsum(softmax(z, 2.0), axis=1)).sum(axis=1)
    rel = plot_reliability(reliability_bins(softmax(z), y), reliability_bins(softmax(z, 2.0), y),
                           tmp_path / "reliability.png", temperature=2.0)
    rc = plot_risk_coverage(risk_coverage(softmax(z, 2.0), y), tmp_path / "sub" /
                            "risk_coverage.png", alpha=0.01, gate_point=(0.4, 0.008))
    for path in (rel, rc):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300
            assert len(set(np.asarray(im.convert("L")).ravel().tolist())) > 10  # not blank

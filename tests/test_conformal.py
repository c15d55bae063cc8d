"""Class-conditional APS prediction sets: scores, quantiles by hand, per-class coverage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cellclf.gate.conformal import APSParams, aps_scores, aps_sets, fit_aps, set_labels
from cellclf.gate.temperature import CalibrationError, softmax


def test_aps_scores_hand_computed() -> None:
    p = np.array([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3], [0.4, 0.2, 0.4]])
    # row 0 order a(.5), c(.3), b(.2) → a .5, c .8, b 1.0; row 2: tie a/c → a first (index order)
    np.testing.assert_allclose(aps_scores(p), [[0.5, 1.0, 0.8], [1.0, 0.6, 0.9],
                                               [0.4, 1.0, 0.8]])


def test_fit_aps_quantile_by_hand() -> None:
    # Class a: 4 calibration cells with true-label scores .5, .6, .7, .9 (K = 2 → score = p_a
    # when a ranks first, else 1). α = 0.2: rank ⌈(4 + 1)·0.8⌉ = 4 → q_a = 0.9.
    # Class b: 3 cells, rank ⌈4·0.8⌉ = 4 > 3 → q_b = +∞ (stored None: b always in the set).
    p = np.array([[0.5, 0.5], [0.6, 0.4], [0.7, 0.3], [0.9, 0.1],
                  [0.2, 0.8], [0.3, 0.7], [0.45, 0.55]])
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    params = fit_aps(p, y, ["a", "b"], alpha_set=0.2)
    assert params.quantiles == {"a": pytest.approx(0.9), "b": None}
    assert params.n_cal == {"a": 4, "b": 3}
    member = aps_sets(np.array([[0.95, 0.05], [0.85, 0.15], [0.1, 0.9]]), params)
    # a's score: .95 (> .9, but a is top-1 → kept), .85 ≤ .9, 1.0 (not top-1) → out; b always in.
    assert member.tolist() == [[True, True], [True, True], [False, True]]
    assert set_labels(member, params.classes) == [["a", "b"], ["a", "b"], ["b"]]
    no_top1 = APSParams(params.classes, 0.2, params.quantiles, params.n_cal, include_top1=False)
    assert aps_sets(np.array([[0.95, 0.05]]), no_top1).tolist() == [[False, True]]
    as_json = json.loads(json.dumps(params.to_dict()))
    assert APSParams.from_dict(as_json) == params
    assert aps_sets(np.array([[0.1, 0.9]]), as_json).tolist() == [[False, True]]  # card section


def test_class_conditional_coverage_on_simulated_data() -> None:
    # Four classes of very different difficulty and frequency; labels drawn from
    # softmax(z / 1.7) while the model reports softmax(z) (over-confident). Each class's
    # coverage must reach 1 − α up to sampling noise (n_test per class ≥ 5 000 → SE ≤ 0.5 %).
    rng = np.random.default_rng(7)
    alpha = 0.1

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        z = rng.normal(0, 2.5, size=(n, 4)) + np.array([3.0, 0.0, -0.5, -1.0])
        probs_true = softmax(z, 1.7)
        y = (rng.random(n)[:, None] > np.cumsum(probs_true, axis=1)).sum(axis=1)
        return softmax(z), np.minimum(y, 3)

    p_cal, y_cal = draw(20_000)
    p_test, y_test = draw(60_000)
    rows = np.arange(len(y_test))
    bare = fit_aps(p_cal, y_cal, ["eos", "neu", "mast", "other"], alpha_set=alpha,
                   include_top1=False)
    with_top1 = APSParams(bare.classes, alpha, bare.quantiles, bare.n_cal, include_top1=True)
    covered_bare = aps_sets(p_test, bare)[rows, y_test]
    member = aps_sets(p_test, with_top1)
    covered = member[rows, y_test]
    assert np.all(covered >= covered_bare)  # adding the top-1 label never loses coverage
    for k in range(4):
        n_k = int((y_test == k).sum())
        assert n_k >= 5000
        # lower bound: 1 − α minus noise (calibration draw + test draw, a few SE);
        # upper bound for the bare sets: the finite-sample quantile is nearly tight.
        assert covered[y_test == k].mean() >= 1 - alpha - 0.015
        assert 1 - alpha - 0.015 <= covered_bare[y_test == k].mean() <= 1 - alpha + 0.02
    # Top-1 alone covers far less: the sets do real work.
    assert (p_test.argmax(axis=1) == y_test).mean() < 0.8
    assert 1.0 < member.sum(axis=1).mean() < 3.0


def test_conformal_refuses_bad_input() -> None:
    p = np.array([[0.9, 0.1], [0.2, 0.8]])
    with pytest.raises(CalibrationError, match="alpha_set"):
        fit_aps(p, np.array([0, 1]), ["a", "b"], alpha_set=1.5)
    with pytest.raises(CalibrationError, match="class names"):
        fit_aps(p, np.array([0, 1]), ["a"])
    params = fit_aps(p, np.array([0, 1]), ["a", "b"])
    with pytest.raises(CalibrationError, match="3 probability columns"):
        aps_sets(np.array([[0.5, 0.3, 0.2]]), params)
    with pytest.raises(CalibrationError, match="invalid"):
        APSParams.from_dict({"classes": ["a"]})

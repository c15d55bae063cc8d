"""Point matching and detection metrics: small hand-computed cases, ties, duplicates, empties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cellclf.detect.matching import detection_metrics, match_points


def test_simple_matching_and_distances() -> None:
    pred = np.array([[0.0, 0.0], [10.0, 0.0]])
    truth = np.array([[1.0, 0.0], [10.0, 2.0], [50.0, 50.0]])
    m = match_points(pred, truth, 3.0)
    assert m.pred_to_truth.tolist() == [0, 1]
    assert m.truth_to_pred.tolist() == [0, 1, -1]
    assert m.distance.tolist() == pytest.approx([1.0, 2.0])
    assert not m.duplicates.any()


def test_maximises_pairs_over_nearest_neighbour() -> None:
    # P0 is nearest to T1, but greedy P0-T1 would leave P1 unmatched; the best matching pairs both
    truth = np.array([[0.0, 0.0], [4.0, 0.0]])
    pred = np.array([[3.0, 0.0], [7.0, 0.0]])
    m = match_points(pred, truth, 3.5)
    assert m.pred_to_truth.tolist() == [0, 1]
    assert m.n_matched == 2
    assert m.distance.tolist() == pytest.approx([3.0, 3.0])


def test_minimises_distance_when_pair_counts_tie() -> None:
    truth = np.array([[0.0, 0.0], [2.0, 0.0]])
    pred = np.array([[0.5, 0.0], [2.5, 0.0]])
    m = match_points(pred, truth, 3.0)
    assert m.pred_to_truth.tolist() == [0, 1]  # crossed would cost 1.5 + 2.5


def test_equidistant_tie_gives_one_match() -> None:
    m = match_points(np.array([[0.0, 0.0]]), np.array([[-2.0, 0.0], [2.0, 0.0]]), 3.0)
    assert m.n_matched == 1
    assert sorted(m.truth_to_pred.tolist()) == [-1, 0]
    assert not m.duplicates.any()


def test_radius_is_inclusive_and_coincident_points_match() -> None:
    m = match_points(np.array([[3.0, 4.0], [9.0, 9.0]]), np.array([[0.0, 0.0], [9.0, 9.0]]), 5.0)
    assert m.pred_to_truth.tolist() == [0, 1]
    assert m.distance.tolist() == pytest.approx([5.0, 0.0])


def test_duplicates_counted() -> None:
    truth = np.array([[0.0, 0.0], [20.0, 0.0]])
    pred = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [40.0, 0.0]])
    m = match_points(pred, truth, 3.0)
    assert m.pred_to_truth.tolist() == [0, -1, -1, -1]
    assert m.duplicates.tolist() == [False, True, True, False]
    met = detection_metrics(pred, truth, ["eosinophil", "neutrophil"], 3.0)
    assert met["precision"] == pytest.approx(1 / 4)
    assert met["duplicate_rate"] == pytest.approx(2 / 4)
    assert met["recall"] == {"eosinophil": 1.0, "neutrophil": 0.0}
    assert met["n_truth"] == {"eosinophil": 1, "neutrophil": 1}
    assert met["recall_all"] == pytest.approx(0.5)


def test_metrics_per_class() -> None:
    truth = np.array([[0.0, 0.0], [100.0, 0.0], [200.0, 0.0], [300.0, 0.0]])
    classes = ["eosinophil", "eosinophil", "mast_cell", "other"]
    pred = np.array([[1.0, 1.0], [201.0, 0.0], [500.0, 500.0]])
    met = detection_metrics(pred, truth, classes, 4.0)
    assert met["recall"] == {"eosinophil": 0.5, "mast_cell": 1.0, "other": 0.0}
    assert met["n_found"] == {"eosinophil": 1, "mast_cell": 1, "other": 0}
    assert met["precision"] == pytest.approx(2 / 3)
    assert met["duplicate_rate"] == 0.0
    assert met["n_pred"] == 3 and met["n_matched"] == 2


def test_empty_inputs() -> None:
    empty = np.zeros((0, 2))
    truth = np.array([[0.0, 0.0], [5.0, 5.0]])
    met = detection_metrics(empty, truth, ["a", "b"], 2.0)
    assert met["recall"] == {"a": 0.0, "b": 0.0}
    assert met["precision"] is None and met["duplicate_rate"] is None
    met = detection_metrics(truth, empty, [], 2.0)
    assert met["recall"] == {} and met["recall_all"] is None
    assert met["precision"] == 0.0 and met["duplicate_rate"] == 0.0
    m = match_points(empty, empty, 1.0)
    assert m.n_matched == 0 and m.pred_to_truth.shape == (0,)
    m = match_points(np.array([[0.0, 0.0]]), np.array([[10.0, 0.0]]), 1.0)
    assert m.n_matched == 0 and not m.duplicates.any()


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="pred0"):
        match_points(np.zeros((3, 3)), np.zeros((1, 2)), 1.0)
    with pytest.raises(ValueError, match="radius"):
        match_points(np.zeros((1, 2)), np.zeros((1, 2)), 0.0)
    with pytest.raises(ValueError, match="truth_classes"):
        detection_metrics(np.zeros((1, 2)), np.zeros((2, 2)), ["a"], 1.0)


def _brute(pred: np.ndarray, truth: np.ndarray, r: float) -> tuple[int, float]:
    """Best (pairs, -total distance) over all partial one-to-one assignments."""
    d = np.linalg.norm(pred[:, None] - truth[None], axis=2)
    best = (0, 0.0)
    for perm in itertools.permutations(tuple(range(len(truth))) + (-1,) * len(pred), len(pred)):
        pairs = [(i, j) for i, j in enumerate(perm) if j >= 0]
        if any(d[i, j] > r for i, j in pairs):
            continue
        cand = (len(pairs), -sum(d[i, j] for i, j in pairs))
        if cand[0] > best[0] or (cand[0] == best[0] and cand[1] > best[1] + 1e-9):
            best = cand
    return best


def test_agrees_with_brute_force_on_random_clusters() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        pred = rng.uniform(0, 8, size=(int(rng.integers(1, 5)), 2))
        truth = rng.uniform(0, 8, size=(int(rng.integers(1, 5)), 2))
        m = match_points(pred, truth, 3.0)
        n, neg_total = _brute(pred, truth, 3.0)
        assert m.n_matched == n
        assert np.nansum(m.distance) == pytest.approx(-neg_total)
        # consistency of the two index maps
        for i, j in enumerate(m.pred_to_truth):
            if j >= 0:
                assert m.truth_to_pred[j] == i

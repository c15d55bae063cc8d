"""One-to-one matching of predicted points to ground-truth points, and detection metrics.

Sits beside the flow as its yardstick: detection candidates (detect.py) and classified cells are
compared with truth annotations (geojson.read_points) to get recall per truth class, precision
and the duplicate rate. Pure numpy/scipy; coordinates in level-0 px, radius in the same px.

Matching maximises the number of pairs closer than the radius, then minimises their total
distance (Hungarian algorithm on each connected component of the "within radius" graph).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Matching:
    """Result of :func:`match_points`.

    ``pred_to_truth[i]`` is the truth index matched to prediction i, or -1;
    ``truth_to_pred[j]`` the prediction matched to truth j, or -1; ``distance[i]`` the distance
    of prediction i to its match (NaN when unmatched); ``duplicates`` marks unmatched predictions
    lying within the radius of a truth point that another prediction already matched.
    """

    pred_to_truth: np.ndarray
    truth_to_pred: np.ndarray
    distance: np.ndarray
    duplicates: np.ndarray

    @property
    def n_matched(self) -> int:
        return int((self.pred_to_truth >= 0).sum())


def _as_points(a: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{what} must be an (N, 2) array of x, y; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite coordinates")
    return arr


def match_points(pred0: np.ndarray, truth0: np.ndarray, radius_px: float) -> Matching:
    """Match predictions to truth one-to-one within ``radius_px`` (inclusive).

    Among all one-to-one matchings using only pairs at distance ≤ radius, this returns one with
    the most pairs and, among those, the least total distance.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    pred = _as_points(pred0, "pred0")
    truth = _as_points(truth0, "truth0")
    if not radius_px > 0:
        raise ValueError(f"radius_px must be positive, got {radius_px}")
    n_p, n_t = len(pred), len(truth)
    p2t = np.full(n_p, -1, dtype=np.int64)
    t2p = np.full(n_t, -1, dtype=np.int64)
    dist = np.full(n_p, np.nan)
    dup = np.zeros(n_p, dtype=bool)
    if n_p == 0 or n_t == 0:
        return Matching(p2t, t2p, dist, dup)

    sdm = cKDTree(pred).sparse_distance_matrix(cKDTree(truth), radius_px, output_type="ndarray")
    pi = sdm["i"].astype(np.int64)
    ti = sdm["j"].astype(np.int64)
    dd = sdm["v"].astype(np.float64)
    if len(pi) == 0:
        return Matching(p2t, t2p, dist, dup)
    # the structured-array output keeps zero-distance pairs (coincident points)
    # bipartite graph: nodes 0..n_p-1 predictions, n_p..n_p+n_t-1 truths
    graph = coo_matrix((np.ones(len(pi)), (pi, ti + n_p)), shape=(n_p + n_t, n_p + n_t))
    _, labels = connected_components(graph, directed=False)
    comp = labels[pi]
    order = np.argsort(comp, kind="stable")
    pi, ti, dd, comp = pi[order], ti[order], dd[order], comp[order]
    bounds = np.flatnonzero(np.diff(comp)) + 1
    for s, e in zip(np.r_[0, bounds], np.r_[bounds, len(comp)], strict=True):
        cp, ct, cd = pi[s:e], ti[s:e], dd[s:e]
        if e - s == 1:
            p2t[cp[0]], t2p[ct[0]], dist[cp[0]] = ct[0], cp[0], cd[0]
            continue
        up, ip = np.unique(cp, return_inverse=True)
        ut, it = np.unique(ct, return_inverse=True)
        # cost: an edge is worth -big + d, a non-edge 0 (and discarded); big exceeds any total
        # distance, so the assignment first maximises the number of edges, then minimises distance
        big = radius_px * (min(len(up), len(ut)) + 1) + 1.0
        cost = np.zeros((len(up), len(ut)))
        cost[ip, it] = cd - big
        rows, cols = linear_sum_assignment(cost)
        keep = cost[rows, cols] < 0
        rows, cols = rows[keep], cols[keep]
        p, t = up[rows], ut[cols]
        p2t[p], t2p[t] = t, p
        dist[p] = cost[rows, cols] + big
    # duplicates: unmatched predictions within the radius of an already matched truth
    unmatched_pair = (p2t[sdm["i"]] < 0) & (t2p[sdm["j"]] >= 0)
    dup[sdm["i"][unmatched_pair]] = True
    return Matching(p2t, t2p, dist, dup)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den > 0 else None


def detection_metrics(
    pred0: np.ndarray,
    truth0: np.ndarray,
    truth_classes: Sequence[str],
    radius_px: float,
) -> dict:
    """Recall per truth class, overall recall and precision, and duplicate rate.

    Returns a JSON-ready dict: ``recall`` {class: float}, ``n_truth`` / ``n_found`` {class: int},
    ``recall_all``, ``precision`` (matched predictions / predictions), ``f1`` (their harmonic
    mean), ``duplicate_rate``
    (duplicates / predictions), ``n_pred``, ``n_matched``, ``n_duplicates``, ``radius_px``.
    Undefined ratios (nothing to divide by) are None.
    """
    truth = _as_points(truth0, "truth0")
    classes = np.asarray(list(truth_classes), dtype=object)
    if len(classes) != len(truth):
        raise ValueError(
            f"truth_classes has {len(classes)} entries but truth0 has {len(truth)} points"
        )
    m = match_points(pred0, truth, radius_px)
    found = m.truth_to_pred >= 0
    n_pred = len(m.pred_to_truth)
    recall: dict[str, float | None] = {}
    n_truth: dict[str, int] = {}
    n_found: dict[str, int] = {}
    for c in sorted({str(c) for c in classes}):
        sel = classes == c
        n_truth[c] = int(sel.sum())
        n_found[c] = int(found[sel].sum())
        recall[c] = _ratio(n_found[c], n_truth[c])
    n_dup = int(m.duplicates.sum())
    recall_all = _ratio(int(found.sum()), len(truth))
    precision = _ratio(m.n_matched, n_pred)
    f1 = (None if recall_all is None or precision is None or recall_all + precision == 0
          else 2 * recall_all * precision / (recall_all + precision))
    return {
        "recall": recall,
        "n_truth": n_truth,
        "n_found": n_found,
        "recall_all": recall_all,
        "precision": precision,
        "f1": f1,
        "duplicate_rate": _ratio(n_dup, n_pred),
        "n_pred": n_pred,
        "n_matched": m.n_matched,
        "n_duplicates": n_dup,
        "radius_px": float(radius_px),
    }

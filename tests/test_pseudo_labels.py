"""Pseudo-labels for the learned detector: votes of several detectors, ignore masks, H blobs."""

from __future__ import annotations

import numpy as np

from cellclf.detect.pseudo_labels import (
    drop_in_boxes,
    haematoxylin_blobs,
    ignore_weight,
    vote_points,
)
from tests.test_detect import Canvas


def test_votes_by_hand() -> None:
    a = np.array([[10.0, 10.0], [50.0, 50.0], [90.0, 10.0]])
    b = np.array([[11.0, 10.0], [52.0, 50.0]])
    c = np.array([[10.0, 12.0], [200.0, 200.0], [51.0, 49.0], [53.0, 51.0]])
    agreed, disputed = vote_points([a, b, c], radius_px=3.0, min_votes=2)
    # (10,10) by all three; (50,50) by all three (c's nearer point joins, its other one is left)
    assert len(agreed) == 2
    assert np.allclose(sorted(map(tuple, agreed))[0], [31 / 3, 32 / 3])
    assert {tuple(p) for p in disputed} == {(90.0, 10.0), (200.0, 200.0), (53.0, 51.0)}
    three, rest = vote_points([a, b, c], radius_px=3.0, min_votes=3)
    assert len(three) == 2 and len(rest) == 3
    two, left = vote_points([a, b], radius_px=3.0)  # two detectors: both must agree
    assert len(two) == 2 and [tuple(p) for p in left] == [(90.0, 10.0)]
    empty, none = vote_points([np.zeros((0, 2)), np.zeros((0, 2))], 3.0)
    assert empty.shape == (0, 2) and none.shape == (0, 2)


def test_ignore_weight_discs_and_boxes() -> None:
    w = ignore_weight((40, 60), np.array([[10.5, 20.5]]), radius_px=3.0,
                      negative_boxes=[(40, 0, 60, 40)], ignore_boxes=[(0, 35, 5, 40)])
    assert w.dtype == np.uint8 and w.shape == (40, 60)
    assert w[20, 10] == 0 and w[20, 13] == 0 and w[20, 14] == 255  # a disc of radius 3 px
    assert (w[:, 40:] == 255).all() and (w[35:, :5] == 0).all()
    assert ignore_weight((5, 5), np.zeros((0, 2)), 2.0).min() == 255
    xy = np.array([[45.0, 5.0], [1.0, 1.0]])
    assert drop_in_boxes(xy, [(40, 0, 60, 40)]).tolist() == [[1.0, 1.0]]


def test_haematoxylin_blobs_find_pale_vesicular_nuclei() -> None:
    mpp = 0.5
    cv = Canvas(100, 60, mpp=mpp)
    centres = [(20.0, 20.0), (50.0, 30.0), (80.0, 40.0)]
    for x, y in centres:
        cv.disc(x, y, 3.5, hem=0.9)  # a dark rim ...
        pale = (cv.x_um - x) ** 2 + (cv.y_um - y) ** 2 <= 2.0**2
        cv.c[pale, 0] = 0.3  # ... around a pale centre
    found = haematoxylin_blobs(cv.rgb(seed=1), mpp)
    for x, y in centres:
        d = np.hypot(found[:, 0] * mpp - x, found[:, 1] * mpp - y)
        assert d.min() < 1.5, (x, y)
    assert len(found) <= 2 * len(centres)
    blank = np.full((80, 80, 3), 240, np.uint8)
    assert len(haematoxylin_blobs(blank, mpp)) == 0

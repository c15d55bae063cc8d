"""HPF maths on hand-computed cases."""

import math

import numpy as np
import pytest

from cellclf.outputs.hpf import density_per_mm2, hpf_radius_um, peak_hpf


def test_radius_of_default_field():
    # r = sqrt(0.237 / pi) mm = 0.274662 mm
    assert hpf_radius_um(0.237) == pytest.approx(274.662, abs=0.001)
    assert hpf_radius_um(math.pi) == pytest.approx(1000.0)
    with pytest.raises(ValueError):
        hpf_radius_um(0)


def test_peak_finds_the_cluster():
    mpp = 0.5  # radius 274.67 µm = 549.3 px
    cluster = np.array([[1000, 1000], [1100, 1000], [1000, 1100], [1200, 1200]], float)
    lone = np.array([[10000, 10000], [20000, 500]], float)
    peak = peak_hpf(np.concatenate([lone, cluster]), mpp)
    assert peak.count == 4
    # the centre is within one radius of every cluster point
    d = np.hypot(cluster[:, 0] - peak.x, cluster[:, 1] - peak.y)
    assert (d <= peak.radius_px).all()
    assert peak.radius_px == pytest.approx(549.325, abs=0.001)


def test_peak_can_sit_between_points():
    # two points 2r - 10 apart: no point-centred field holds both, a grid centre between them does
    mpp = 1.0
    r = hpf_radius_um(0.237)
    pts = np.array([[0.0, 0.0], [2 * r - 10, 0.0]])
    assert peak_hpf(pts, mpp, grid_step_fraction=0.01).count == 2


def test_empty_and_density():
    assert peak_hpf(np.zeros((0, 2)), 0.25).count == 0
    assert density_per_mm2(10, 2.0) == 5.0
    assert density_per_mm2(3, 0.0) is None

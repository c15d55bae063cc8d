"""Selection maths of ``cellclf label`` (pure) and the project's refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellclf.errors import ConfigError
from cellclf.labelling.project import Project, ProjectConfig
from cellclf.labelling.rounds import calibration_needs, holdout_metrics
from cellclf.labelling.selection import (
    cell_features,
    k_center_greedy,
    kmeans_medoids,
    pool_features,
    random_batch,
    select_batch,
    uncertainty,
)

REPO = Path(__file__).resolve().parents[1]


def clusters(sizes: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(10.0 * k, 0.3, (n, 4)) for k, n in enumerate(sizes)])
    return x.astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


def test_k_center_covers_rare_clusters_that_random_misses():
    x, group = clusters([500, 500, 5, 5, 5])
    pick = k_center_greedy(x, 5, np.arange(len(x)))
    assert sorted(group[pick]) == [0, 1, 2, 3, 4]  # one per cluster, the rare ones too
    assert len(set(pick.tolist())) == 5
    hits = [len(set(group[random_batch(5, np.zeros(len(x), bool), s)])) for s in range(20)]
    assert np.mean(hits) < 3.5


def test_kmeans_medoids_take_one_central_cell_per_mode():
    x, group = clusters([300, 300, 20, 20, 20])
    means = np.array([x[group == g].mean(axis=0) for g in range(5)])
    picks = [kmeans_medoids(x, 5, np.arange(len(x)), seed=s) for s in range(5)]
    assert all(sorted(group[p]) == [0, 1, 2, 3, 4] for p in picks)  # rare modes too
    off_centre = [np.linalg.norm(x[p] - means[group[p]], axis=1).mean() for p in picks]
    kc = k_center_greedy(x, 5, np.arange(len(x)))
    kc_off = np.linalg.norm(x[kc] - means[group[kc]], axis=1).mean()
    assert max(off_centre) < 0.5 < kc_off  # medoids sit in the modes, k-center on their edges
    with pytest.raises(ValueError, match="selection method"):
        select_batch(x, 3, np.zeros(len(x), bool), method="spiral")


def test_k_center_counts_distance_from_cells_already_queued():
    x, group = clusters([50, 50, 50])
    queued = np.flatnonzero(group < 2)[:10]  # cells of clusters 0 and 1 already queued
    pick = k_center_greedy(x, 1, np.flatnonzero(group < 3), centres=queued)
    assert group[pick[0]] == 2


def test_select_batch_takes_uncertain_cells_and_never_queued_ones():
    x, group = clusters([100, 100])
    probs = np.tile([0.99, 0.01], (200, 1))
    probs[group == 1] = [0.5, 0.5]  # the model is unsure about cluster 1 only
    queued = np.zeros(200, bool)
    queued[100:110] = True
    for method in ("kmeans", "kcenter"):
        pick = select_batch(x, 10, queued, probs, pool_factor=5, method=method)
        assert len(pick) == 10 and not queued[pick].any()
        assert (group[pick] == 1).all()
    np.testing.assert_allclose(uncertainty(np.array([[0.5, 0.5], [1.0, 0.0]])), [1.0, 0.0])


def test_features_see_stain_and_size():
    crops = np.full((3, 64, 64, 3), 240, np.uint8)
    crops[1, 22:42, 22:42] = (70, 40, 120)  # a dark purple nucleus
    crops[2, 12:52, 12:52] = (70, 40, 120)  # a bigger one
    f = cell_features(crops)
    size = f[:, 16]
    assert size[0] == 0 < size[1] < size[2]
    z = pool_features(f, np.array([0, 0, 1]), 2)
    assert z.shape == (3, f.shape[1] + 2) and np.isfinite(z).all()


def test_estimates_and_calibration_needs():
    m = holdout_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["a", "b", "c"])
    assert m["per_class"]["b"]["accuracy"] == pytest.approx(2 / 3)
    assert m["per_class"]["c"]["n"] == 0 and m["per_class"]["c"]["accuracy"] is None
    assert m["macro_f1"] == pytest.approx(np.mean([2 / 3, 0.8]))
    cfg = ProjectConfig(classes=["a", "other"], other_class="other", alpha=0.1, delta=0.05,
                        holdout_fraction=0.5)
    need = calibration_needs(np.array([0] * 10 + [1] * 30), cfg)
    n = need["a"]["needed"]
    assert 0.9 ** n <= 0.05 / 3 < 0.9 ** (n - 1)  # zero errors in n cells certify α = 0.1
    assert need["a"]["more"] == n - 10
    assert need["a"]["more_labels_est"] == int(np.ceil((n - 10) / 0.25 / 0.5))


def test_project_config_and_cli_refusals(tmp_path):
    with pytest.raises(ConfigError, match="other_class"):
        ProjectConfig.from_dict({"classes": ["a", "b"], "other_class": "x"}, "p.yaml")
    with pytest.raises(ConfigError, match="unknown settings"):
        ProjectConfig.from_dict({"clases": ["a"]}, "p.yaml")
    with pytest.raises(ConfigError, match="not a labelling project"):
        Project(tmp_path).load_config()
    for args, words in ((["--next", str(tmp_path)], "not a labelling project"),
                        (["--out", str(tmp_path / "p")], "needs the slides"),
                        (["--next", str(tmp_path), "--out", str(tmp_path)], "exactly one")):
        r = subprocess.run([sys.executable, "-m", "cellclf.cli", "label", *args],
                           capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 2 and words in " ".join(r.stderr.split()), r.stderr
        assert "Traceback" not in r.stderr

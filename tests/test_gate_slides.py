"""Slides as the unit: the cell-level bound breaks its δ when slides differ; the slide-level one
keeps it (simulation, docs/gate.md "Slides as the unit"), plus the maths of gate/slide_bound.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import betainc

from cellclf.gate.risk_bounds import min_cells_zero_errors, scan_thresholds
from cellclf.gate.slide_bound import (
    GRID,
    fit_slide_gate,
    grid_at_or_above,
    hb_pvalue,
    min_slides,
    scan_slide_thresholds,
    slide_losses,
    slides_needed,
)

# Simulation model (stated in docs/gate.md): a cell's confidence is s = 1 − q, q = 0.5·Beta(1, B);
# on slide j its error probability is m_j·q with the slide's multiplier m_j = 2·Beta(a, a)
# (mean 1; a = 2: coefficient of variation 45 %, per-slide error rates spread 0–2× the mean).
B = 5.0


def true_accepted_error(lam: float) -> float:
    """E over slides and cells of the error rate among cells with s ≥ λ: E[m]·E[q | q ≤ 1 − λ]."""
    u = min(max((1.0 - lam) / 0.5, 0.0), 1.0)
    return 0.5 / (1.0 + B) * betainc(2.0, B, u) / max(betainc(1.0, B, u), 1e-300)


def simulate(reps: int, n_slides: int, cells_per_slide: int, alpha: float, spread_a: float,
             delta: float, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    broke_cell = broke_slide = cert_cell = cert_slide = 0
    n_min = min_cells_zero_errors(alpha, delta, 1)
    slide_of = np.repeat(np.arange(n_slides), cells_per_slide)
    for _ in range(reps):
        m = 2.0 * rng.beta(spread_a, spread_a, n_slides)
        q = 0.5 * rng.beta(1.0, B, (n_slides, cells_per_slide))
        wrong = rng.random(q.shape) < m[:, None] * q
        conf = 1.0 - q
        cell = scan_thresholds(conf.reshape(1, -1), wrong.reshape(1, -1), alpha, 1 - delta,
                               n_min=n_min)["threshold"][0]
        if not np.isnan(cell):
            cert_cell += 1
            broke_cell += true_accepted_error(cell) > alpha
        losses, _ = slide_losses(conf.ravel(), wrong.ravel(), slide_of, n_slides)
        slide = scan_slide_thresholds(losses, alpha, delta)["threshold"]
        if slide is not None:
            cert_slide += 1
            broke_slide += true_accepted_error(slide) > alpha
    return {"cell_broke": broke_cell / reps, "slide_broke": broke_slide / reps,
            "cell_certified": cert_cell / reps, "slide_certified": cert_slide / reps}


@pytest.mark.slow
def test_cell_bound_breaks_delta_with_few_varying_slides_slide_bound_keeps_it():
    # 8 calibration slides × 3000 cells (the demo's calibration set is 8 slides, 30 000 cells)
    r = simulate(reps=120, n_slides=8, cells_per_slide=3000, alpha=0.02, spread_a=2.0,
                 delta=0.05, seed=2026)
    assert r["cell_certified"] > 0.8
    assert r["cell_broke"] > 0.05 + 3 * math.sqrt(0.05 * 0.95 / 120)  # measured 0.25 at 150 reps
    assert r["slide_broke"] == 0.0  # 8 < 149 slides: the slide gate certifies nothing …
    assert r["slide_certified"] == 0.0  # … and says so, instead of promising


@pytest.mark.slow
def test_slide_bound_keeps_delta_and_certifies_with_enough_slides():
    r = simulate(reps=100, n_slides=200, cells_per_slide=120, alpha=0.05, spread_a=2.0,
                 delta=0.05, seed=7)
    assert r["slide_certified"] > 0.9  # power
    assert r["slide_broke"] <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 100)


def test_hb_pvalue_zero_loss_and_minimum_slides():
    assert hb_pvalue(0.0, 100, 0.05) == pytest.approx(0.95 ** 100)
    assert hb_pvalue(0.06, 1000, 0.05) == 1.0  # mean above α: no evidence at all
    assert min_slides(0.01, 0.05, 7) == 492
    assert min_slides(0.05, 0.05, 7) == 97
    assert min_slides(0.01, 0.05, 1) == 299
    need = slides_needed(0.05, 0.025, 0.05, 7)
    assert need is not None and need > 97
    assert hb_pvalue(0.025, need, 0.05) <= 0.05 / 7 < hb_pvalue(0.025, need - 1, 0.05)
    assert slides_needed(0.05, 0.05, 0.05, 7) is None


def test_slide_losses_match_a_direct_count():
    rng = np.random.default_rng(3)
    conf = rng.uniform(0.3, 1.0, 500)
    wrong = rng.random(500) < 0.2
    slide = rng.integers(0, 5, 500)
    grid = np.array([0.99, 0.9, 0.7, 0.5])
    losses, n_acc = slide_losses(conf, wrong, slide, 5, grid)
    for s in range(5):
        for j, lam in enumerate(grid):
            sel = (slide == s) & (conf >= lam)
            assert n_acc[s, j] == sel.sum()
            assert losses[s, j] == pytest.approx(wrong[sel].mean() if sel.any() else 0.0)


def test_fit_slide_gate_reports_slides_and_what_is_missing():
    rng = np.random.default_rng(5)
    n = 3000
    labels = rng.integers(0, 3, n)
    probs = np.full((n, 3), 0.01)
    probs[np.arange(n), labels] = 0.98
    slides = np.array([f"s{i % 6}" for i in range(n)])
    gate = fit_slide_gate(probs / probs.sum(1, keepdims=True), labels, slides, ["a", "b", "c"],
                          alpha=0.01, delta=0.05, n_tests=3)
    assert gate["n_slides"] == 6 and gate["slides"] == [f"s{i}" for i in range(6)]
    assert all(t is None for t in gate["thresholds"].values())
    assert "6 calibration slides" in gate["notes"]["a"] and "at least 408" in gate["notes"]["a"]
    many = np.array([f"s{i % 600}" for i in range(n)])
    gate = fit_slide_gate(probs / probs.sum(1, keepdims=True), labels, many, ["a", "b", "c"],
                          alpha=0.01, delta=0.05, n_tests=3)
    assert all(t is not None for t in gate["thresholds"].values())
    assert gate["automation"]["a"] == 1.0
    assert grid_at_or_above(0.5, gate["thresholds"]["a"]) in GRID

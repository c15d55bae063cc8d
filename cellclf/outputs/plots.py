"""Calibration figures for the evaluation report: reliability.png and risk_coverage.png.

Where it sits in the flow: trainer side, after ``calibrate`` and ``fit_gate``; the figures go
beside metrics.json in the evaluation output. matplotlib (Agg backend) is imported inside the
functions, so importing this module costs nothing and the deployment path never needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cellclf.gate.temperature import ReliabilityBins, RiskCoverage


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _bars(ax: Any, bins: ReliabilityBins, title: str) -> None:
    width = bins.upper - bins.lower
    used = bins.count > 0
    acc = np.where(used, bins.accuracy, 0.0)
    ax.bar(bins.lower, acc, width=width, align="edge", color="#4c72b0", edgecolor="white",
           label="accuracy")
    conf = np.where(used, bins.confidence, 0.0)
    gap_lo, gap_hi = np.minimum(acc, conf), np.abs(acc - conf)
    ax.bar(bins.lower[used], gap_hi[used], bottom=gap_lo[used], width=width[used], align="edge",
           color="#dd8452", alpha=0.5, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max probability)", ylabel="accuracy",
           title=f"{title}  ECE = {bins.ece:.3f}")
    ax.legend(loc="upper left", fontsize=8)


def plot_reliability(before: ReliabilityBins, after: ReliabilityBins, path: str | Path,
                     temperature: float | None = None) -> Path:
    """Write the before/after temperature-scaling reliability diagram (two panels) to ``path``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), constrained_layout=True)
    _bars(axes[0], before, "before (T = 1)")
    _bars(axes[1], after, "after" + (f" (T = {temperature:.3g})" if temperature else ""))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_risk_coverage(curve: RiskCoverage, path: str | Path, alpha: float | None = None,
                       gate_point: tuple[float, float] | None = None,
                       label: str = "max-probability selector") -> Path:
    """Write the risk–coverage curve to ``path``; mark α and the gate's (coverage, risk)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.4), constrained_layout=True)
    ax.step(curve.coverage, curve.risk, where="post", lw=1.5,
            label=f"{label} (AURC {curve.aurc:.4f})")
    if alpha is not None:
        ax.axhline(alpha, color="crimson", ls="--", lw=1, label=f"α = {alpha:g}")
    if gate_point is not None:
        ax.plot(*gate_point, "o", color="black", label="gate on this split")
    top = max(float(curve.risk.max()) * 1.05, (alpha or 0.0) * 2, 1e-3)
    ax.set(xlim=(0, 1), ylim=(0, top), xlabel="coverage (share of cells accepted)",
           ylabel="risk (error among accepted)", title="risk–coverage")
    ax.legend(loc="upper left", fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

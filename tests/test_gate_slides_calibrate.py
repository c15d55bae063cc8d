"""`cellclf calibrate` states its slide-level guarantee, the slides it used, and how many it lacks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cellclf.calibration.bundle_gate import slide_level_gate
from cellclf.cli import app
from cellclf.gate.thresholds import fit_gate


@pytest.fixture()
def bundle(random_bundle, tmp_path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(random_bundle, out)
    return out


@pytest.mark.slow
def test_calibrate_says_it_has_too_few_slides(bundle, tiny_svs, tmp_path):
    data = tmp_path / "cal"
    data.mkdir()
    for f in tiny_svs:
        shutil.copyfile(f, data / f.name)
    result = CliRunner().invoke(app, ["calibrate", str(bundle), "--data", str(data)])
    assert result.exit_code == 0, result.output
    card = json.loads((bundle / "card.json").read_text())
    sg = card["gate_slides"]
    assert sg["n_slides"] == 1 and sg["unit"] == "cells" and not sg["established"]
    assert sorted(sg["slides"]) == sorted(card["calibration"]["slides"])
    assert "slide-level guarantee not established" in sg["statement"]
    assert "at least 492 are needed" in sg["statement"]
    assert "slide-level guarantee not established" in card["gate"]["guarantee"]
    assert card["calibration"]["gate_unit"] == "cells"
    out = " ".join(result.output.split())
    assert "calibration slides (" in out and "at least 492 are needed" in out
    forced = CliRunner().invoke(app, ["calibrate", str(bundle), "--data", str(data),
                                      "--gate-unit", "slides"])
    assert forced.exit_code == 0, forced.output
    card = json.loads((bundle / "card.json").read_text())
    assert card["gate_slides"]["unit"] == "slides"
    assert all(t is None for t in card["gate"]["thresholds"].values())  # nothing certified


def test_slides_unit_raises_thresholds_to_a_certified_grid_point():
    rng = np.random.default_rng(1)
    n = 6000
    labels = rng.integers(0, 2, n)
    probs = np.full((n, 2), 0.02)
    probs[np.arange(n), labels] = 0.98
    gate = fit_gate(probs, labels, ["a", "b"], alpha=0.05, delta=0.05)
    from cellclf.gate.slide_bound import GRID, fit_slide_gate

    sg = fit_slide_gate(probs, labels, np.arange(n) % 300, ["a", "b"], 0.05, 0.05, 2)
    out, unit = slide_level_gate(gate, sg, "auto")
    assert unit == "slides"
    for c in ("a", "b"):
        assert out.thresholds[c] in GRID
        assert out.thresholds[c] >= max(gate.thresholds[c], sg["thresholds"][c])
    assert "Slide-level statement" in out.guarantee
    few = fit_slide_gate(probs, labels, np.arange(n) % 30, ["a", "b"], 0.05, 0.05, 2)
    assert slide_level_gate(gate, few, "auto")[1] == "cells"




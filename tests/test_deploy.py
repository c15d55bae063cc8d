"""The torch-free deployment path: with torch, torchvision, Lightning and albumentations made
unimportable, `cellclf detect` and `cellclf infer` (onnxruntime) still run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BLOCKER = textwrap.dedent("""
    import sys

    class BlockTraining:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "torchvision", "lightning", "albumentations"}:
                raise ImportError(f"{name} is blocked: this is the torch-free deploy test")
            return None

    sys.meta_path.insert(0, BlockTraining())
    from cellclf.cli import main

    sys.argv = ["cellclf", *sys.argv[1:]]
    try:
        main()
    finally:
        assert "torch" not in sys.modules, "torch was imported"
""")


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "deploy_cli.py"
    script.write_text(BLOCKER)
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", ORT_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_detect_and_infer_without_torch(tiny_slide, shipped_model, tmp_path):
    slide, truth = tiny_slide
    det = _run(tmp_path, "detect", str(slide), "-o", str(tmp_path / "cand.geojson"),
               "--truth", str(truth), "--no-progress")
    assert det.returncode == 0, det.stderr[-2000:]
    metrics = json.loads((tmp_path / "cand.metrics.json").read_text())
    assert metrics["recall"]["eosinophil"] >= 0.97

    out = tmp_path / "out"
    inf = _run(tmp_path, "infer", str(slide), "--model", str(shipped_model), "--out", str(out))
    assert inf.returncode == 0, inf.stderr[-2000:]
    summary = json.loads((out / "tiny" / "summary.json").read_text())
    assert summary["parameters"]["backend"] == "onnx"
    assert summary["n_cells"] > 100


def test_torch_backend_is_refused_clearly_without_torch(tiny_slide, shipped_model, tmp_path):
    inf = _run(tmp_path, "infer", str(tiny_slide[0]), "--model", str(shipped_model),
               "--out", str(tmp_path / "o"), "--backend", "torch")
    assert inf.returncode != 0
    assert "Traceback" not in inf.stderr and "needs PyTorch" in inf.stderr

"""Scale-out with Ray: worker planning by hand, and a batch sharded over a local CPU Ray cluster that
gives the same outputs, manifest and review queue as the local loop."""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cellclf.errors import CellclfError
from cellclf.pipeline.batch import run_batch
from cellclf.pipeline.ray_workers import plan_workers


def test_plan_workers_gpu_and_cpu():
    # 4 GPUs, 10 slides: one worker per GPU, each pinned to one GPU
    assert plan_workers({"GPU": 4, "CPU": 16}, 10, 0, "auto", 0) == (4, {"num_gpus": 1, "num_cpus": 1},
                                                                    "cuda")
    # --gpus 2 of 4, and never more workers than slides
    assert plan_workers({"GPU": 4, "CPU": 16}, 10, 2, "cuda:3", 0)[0] == 2
    assert plan_workers({"GPU": 4, "CPU": 16}, 3, 0, "auto", 0)[0] == 3
    # --device cpu ignores the GPUs: 16 CPUs / 4 per worker
    assert plan_workers({"GPU": 4, "CPU": 16}, 10, 0, "cpu", 4) == (4, {"num_cpus": 4}, "cpu")
    # no GPUs: workers=0 reserves one CPU each; 5 CPUs / 2 → 2 workers
    assert plan_workers({"CPU": 2}, 10, 0, "auto", 0) == (2, {"num_cpus": 1}, "auto")
    assert plan_workers({"CPU": 5}, 10, 0, "auto", 2) == (2, {"num_cpus": 2}, "auto")
    assert plan_workers({"CPU": 1}, 10, 0, "auto", 4) == (1, {"num_cpus": 4}, "auto")
    with pytest.raises(CellclfError, match="--gpus 2 asks for more GPUs than Ray sees \\(1\\)"):
        plan_workers({"GPU": 1, "CPU": 8}, 10, 2, "auto", 0)


def test_missing_ray_says_how_to_install(monkeypatch):
    from cellclf.pipeline.ray_workers import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail as if not installed
    with pytest.raises(CellclfError, match=re.escape("pip install 'cellclf[ray]'")):
        import_ray()


@pytest.fixture(scope="module")
def ray_mod():
    """A 2-CPU local Ray cluster for this module (run_batch joins it rather than starting one)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cellclf[ray]')")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def slides(tiny_slide, tiny_svs, tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("raybatch")
    bad = d / "broken.svs"
    bad.write_bytes(tiny_svs[0].read_bytes()[:5000])
    return [str(tiny_slide[0]), str(tiny_svs[0]), str(bad)]


def _store_rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return sorted(con.execute(
            "SELECT i.slide_id, i.cell_id, i.x, i.y, i.predicted, i.probs, i.conformal_set, i.reason,"
            " i.priority, length(g.crop_png), length(g.context_png) FROM items i JOIN images g"
            " ON g.slide_id = i.slide_id AND g.cell_id = i.cell_id"))


def _outputs(out: Path) -> dict:
    snap: dict = {"store": _store_rows(out / "review.sqlite")}
    for sid in ("tiny", "tiny_svs"):
        snap[sid] = pq.read_table(out / sid / "cells.parquet").to_pydict()
        summary = json.loads((out / sid / "summary.json").read_text())
        snap[sid + "_summary"] = {k: summary[k] for k in ("n_cells", "counts", "per_mm2",
                                                          "peak_hpf", "tissue_area_mm2")}
        snap[sid + "_gate"] = {k: summary["gate"][k] for k in ("automation_rate", "reasons")}
    return snap


@pytest.mark.slow
def test_ray_batch_equals_local_batch(ray_mod, slides, shipped_model, tmp_path):
    from rich.console import Console

    local, sharded = tmp_path / "local", tmp_path / "ray"
    ref = run_batch(slides, shipped_model, local, backend="onnx", workers=2)
    log = io.StringIO()
    report = run_batch(slides, shipped_model, sharded, backend="onnx", workers=1,
                       ray_address="auto", console=Console(file=log, width=200))
    assert ray_mod.is_initialized()  # a cluster it joined is left running
    assert (report.done, report.failed, report.skipped, report.exit_code) == (2, 1, 0, 1)
    assert (ref.done, ref.failed) == (2, 1)
    text = log.getvalue()
    # a 2-CPU cluster with one CPU per worker: two worker processes shared the slides
    match = re.search(r"(\d+) Ray worker\(s\): (.*)", text)
    assert match and int(match[1]) == len(set(re.findall(r"pid (\d+)", match[2]))) == 2
    got, want = _outputs(sharded), _outputs(local)
    assert got == want and len(got["store"]) > 0
    rows = (sharded / "manifest.csv").read_text().splitlines()
    assert sum(",done," in r for r in rows) == 2
    failed = [r for r in rows if ",failed," in r]
    assert len(failed) == 1 and failed[0].startswith("broken,")
    local_failed = [r for r in (local / "manifest.csv").read_text().splitlines() if ",failed," in r]
    assert failed[0].split(",")[3] == local_failed[0].split(",")[3]  # same reason
    assert not list(sharded.glob(".tmp-*"))


@pytest.mark.slow
def test_cli_gpus_without_gpus_is_a_clear_error(ray_mod, slides, shipped_model, tmp_path):
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU; the error path needs one without")
    except ImportError:
        pass
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", ORT_DISABLE_TELEMETRY="1",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "cellclf.cli", "infer", slides[1], "--model",
                           str(shipped_model), "--out", str(tmp_path / "o"), "--gpus", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "--gpus 1 asks for more GPUs than Ray sees (0)" in proc.stderr
    assert not (tmp_path / "o" / "manifest.csv").exists()

"""Shared pytest fixtures: environment, the real slides beside the checkout, tiny synthetic slides.

Synthetic slides are rendered once per session (small, a few seconds) and shared by every test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_WSI = REPO.parent / "shared" / "data" / "wsi"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("gpu" in item.keywords for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def pg():
    """A throwaway PostgreSQL server (Debian's binaries, a temp cluster) for the review tests."""
    from cellclf.review.pgcluster import PostgresUnavailable, ThrowawayPostgres

    try:
        server = ThrowawayPostgres().start()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL not available: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_wsi() -> Path:
    """The real slides in ../shared/data/wsi; tests using them skip when the folder is absent."""
    if not SHARED_WSI.is_dir():
        pytest.skip(f"real slides not found at {SHARED_WSI} (../shared is not beside the checkout)")
    return SHARED_WSI


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def tiny_slide(synth_dir: Path) -> tuple[Path, Path]:
    """A 2048×2048 synthetic 40× TIFF (0.25 µm/px, 0.5 mm square) and its truth GeoJSON."""
    from cellclf.synth import render_slide

    return render_slide(synth_dir, 2048, 2048, mpp=0.25, seed=11, difficulty=0.3, fmt="tiff",
                        name="tiny")


@pytest.fixture(scope="session")
def tiny_svs(synth_dir: Path) -> tuple[Path, Path]:
    """A 1536×1024 synthetic Aperio-style SVS at 0.5 µm/px and its truth GeoJSON."""
    from cellclf.synth import render_slide

    return render_slide(synth_dir, 1536, 1024, mpp=0.5, seed=12, difficulty=0.3, fmt="svs",
                        name="tiny_svs")


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained (random-weight) resnet18 bundle with model.onnx and a hand-set gate: fast to
    make, and enough to test export parity, engines and the inference plumbing."""
    import torch

    from cellclf.card import Card
    from cellclf.model.network import build_model, save_bundle
    from cellclf.model.onnx_export import export_onnx

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bundle") / "random-v0"
    classes = ("eosinophil", "neutrophil", "mast_cell", "other")
    card = Card(name="random-v0", classes=classes, architecture={"backbone": "resnet18"},
                description="untrained test bundle")
    model = build_model(card)
    # a random net's outputs are nearly uniform; widen them so the gate has decisions to make
    with torch.no_grad():
        model.backbone.fc.weight.mul_(40.0)
    card = save_bundle(model, card, out)
    gate = {"classes": list(classes), "alpha": 0.01, "delta": 0.05,
            "thresholds": {"eosinophil": 0.5, "neutrophil": 0.5, "mast_cell": None, "other": 0.6},
            "n_cal": {c: 1000 for c in classes}}
    import json

    data = json.loads((out / "card.json").read_text())
    data["gate"] = gate
    (out / "card.json").write_text(json.dumps(data, indent=2))
    export_onnx(out)
    return out


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    """The default bundle committed in models/ (what `cellclf infer` uses without --model)."""
    from cellclf.card import DEFAULT_MODEL

    path = REPO / "models" / DEFAULT_MODEL
    if not (path / "card.json").is_file():
        pytest.skip(f"shipped model not found at {path}")
    return path

"""One slide of a batch, wherever it runs (the local loop or a Ray worker): run_slide → results →
review store, returning the manifest row the driver records. Never raises for a bad slide."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cellclf.card import Card
from cellclf.errors import CellclfError, os_error_message
from cellclf.gate.audit_bound import DEFAULT_AUDIT_RATE, DEFAULT_BLIND_SHARE
from cellclf.model.engine import Engine
from cellclf.outputs.clinical_call import load_rules, manifest_text
from cellclf.outputs.manifest import ManifestRow
from cellclf.outputs.results import count_table, write_slide_results
from cellclf.pipeline.run_slide import RunParams, run_slide
from cellclf.review.store import ReviewStore


@dataclass(frozen=True)
class SlideJob:
    """Everything a worker needs besides the slide (picklable: it travels to Ray workers)."""

    out_dir: Path
    model: str
    backend: str = "auto"
    device: str = "auto"
    workers: int = 0
    mpp: float | None = None
    hpf_area_mm2: float = 0.237
    batch: int | None = None
    precision: str = "fp32"
    device_decode: str = "auto"  # auto | on | off: JPEG decoding on the GPU (device stage)
    audit_rate: float = DEFAULT_AUDIT_RATE  # share of auto-accepted cells queued for the audit
    blind_share: float = DEFAULT_BLIND_SHARE  # share of gated cells reviewed blind as well
    site: str | None = None  # audit site / scanner tag (default: the slide's vendor)
    clinical_rules: str | None = None  # YAML of clinical rules (default configs/clinical_rules.yaml)


@dataclass
class SlideOutcome:
    """What one slide's work reports back to the driver, which alone writes the manifest."""

    row: ManifestRow
    counts: dict[str, dict[str, int]] | None = None
    other_class: str | None = None  # the card's catch-all (left out of the console line)
    ood_reasons: list[str] | None = None  # the slide-level guard's reasons, when it flagged

    @classmethod
    def failed(cls, slide_id: str, path: str, reason: str, seconds: float = 0.0) -> SlideOutcome:
        return cls(ManifestRow(slide_id, path, "failed", reason, 0, 0, seconds, utc_now()))


def process_slide(job: SlideJob, path: Path, slide_id: str, index: int, engine: Engine,
                  store: ReviewStore,
                  versions: dict[str, str], progress: Any = None) -> SlideOutcome:
    """The per-slide body of a batch: run_slide → write_slide_results → review store. Never raises:
    a bad slide comes back as a failed outcome with its reason. Used by the local loop and by the
    Ray workers of :mod:`cellclf.pipeline.ray_workers`."""
    card = engine.card
    params = RunParams(workers=job.workers, mpp_override=job.mpp,
                       batch=job.batch or getattr(engine, "batch", 512),
                       device_decode=job.device_decode, audit_rate=job.audit_rate,
                       blind_share=job.blind_share, site=job.site)
    run_params = params.to_dict() | {"backend": engine.backend, "device": job.device,
                                     "precision": job.precision, "model": job.model,
                                     "hpf_area_mm2": job.hpf_area_mm2}

    def add_review(items: list) -> None:
        store.add_items(items)
        _fault(f"mid_review:{index}")

    t0 = time.perf_counter()
    try:
        result = run_slide(path, engine, card, slide_id=slide_id, params=params,
                           on_review=add_review, progress=progress)
        _fault(f"before_results:{index}")
        final = write_slide_results(job.out_dir, result, card, run_params, versions,
                                    job.hpf_area_mm2, load_rules(job.clinical_rules))
        _fault(f"before_manifest:{index}")
        calls = _read_calls(final)
        row = ManifestRow(slide_id, str(path), "done", "", result.n_cells,
                          int((~result.accept).sum()), round(time.perf_counter() - t0, 3), utc_now(),
                          n_audited=int(result.audited.sum()) if result.audited is not None else 0,
                          clinical_call=manifest_text(calls))
        ood = result.ood or {}
        return SlideOutcome(row, count_table(result), card.other_class,
                            list(ood.get("reasons", [])) if ood.get("flagged") else None)
    except Exception as exc:  # noqa: BLE001 - one bad slide never stops the batch
        reason = (str(exc) if isinstance(exc, CellclfError) else os_error_message(exc)
                  if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}")
        return SlideOutcome.failed(slide_id, str(path), reason, round(time.perf_counter() - t0, 3))


def _read_calls(slide_dir: Path) -> list[dict]:
    import json

    return json.loads((Path(slide_dir) / "summary.json").read_text()).get("clinical_call", [])


def open_store(url: str, card: Card) -> ReviewStore:
    return ReviewStore(url, classes=list(card.classes))


def _fault(point: str) -> None:
    """Crash-test hook: SIGKILL this process at a named point when ``CELLCLF_FAULT`` names it
    (used by the kill-and-resume test; never set in normal use)."""
    if os.environ.get("CELLCLF_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

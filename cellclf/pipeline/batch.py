"""Batch inference over many slides: the main job of cellclf (``cellclf infer``).

Sits on top of the flow: expands the slide arguments, loads the engine once, runs
:func:`cellclf.pipeline.run_slide.run_slide` per slide, writes ``DIR/<slide_id>/`` through
:mod:`cellclf.outputs.results`, queues gated cells in the review store, and keeps ``DIR/manifest.csv``.
A bad slide is recorded as failed with its reason and the batch goes on; finished slides are
skipped on a rerun unless ``overwrite``. Exit status (see the CLI): 0 all slides done, 1 if any failed.
The per-slide work is one function, :func:`process_slide`, run here in a loop or, with ``--gpus`` /
``--ray``, by Ray workers (:mod:`cellclf.pipeline.ray_workers`); this driver alone writes the manifest.

Crash safety: review items are keyed by (slide_id, cell_id) and re-adding is a no-op; cell ids follow
the deterministic tile order; the slide folder appears by one rename after all its files are written;
the manifest row is written last. A kill at any point therefore leaves either no trace of the slide
(rerun redoes it) or a finished slide (rerun skips it), and never duplicated review cells.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from cellclf.card import load_card
from cellclf.errors import CellclfError
from cellclf.gate.audit_bound import DEFAULT_AUDIT_RATE, DEFAULT_BLIND_SHARE
from cellclf.gate.slide_guard import OOD_ACTION
from cellclf.model.engine import load_engine
from cellclf.outputs.clinical_call import load_rules
from cellclf.outputs.manifest import Manifest, ManifestRow, slide_id_for
from cellclf.pipeline.ray_workers import run_on_ray
from cellclf.pipeline.slide_job import SlideJob, SlideOutcome, open_store, process_slide, utc_now
from cellclf.versions import software_versions
from cellclf.wsi.slide import PLAIN_IMAGE_SUFFIXES

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif",
                  ".svslide", ".dcm"}


def expand_slides(args: list[str], plain_images: bool = False) -> list[Path]:
    """Files, globs, folders (their slide files, sorted) or a text file of paths (one per line).
    ``plain_images``: a folder's PNG/JPEG images count as slides too (``infer --mpp``: a tile
    folder); otherwise a slide folder's preview or label pictures are left alone."""
    suffixes = SLIDE_SUFFIXES | (set(PLAIN_IMAGE_SUFFIXES) if plain_images else set())
    out: list[Path] = []
    for arg in args:
        p = Path(arg)
        if any(ch in arg for ch in "*?["):
            out += [Path(m) for m in sorted(glob.glob(arg, recursive=True))]
        elif p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in suffixes)
        elif p.suffix.lower() in {".txt", ".lst", ".list"} and p.is_file():
            try:
                lines = p.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as exc:
                raise CellclfError(f"{p} is not a text list of slide paths (not UTF-8 text): give "
                                   "one slide path per line, or the slides themselves") from exc
            for line in lines:
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line)
                    out.append(q if q.is_absolute() else (p.parent / q))
        else:
            out.append(p)  # a missing file becomes a failed row with a clear reason
    seen: set[Path] = set()
    unique = []
    for q in out:
        key = q.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(q)
    return unique



@dataclass
class BatchReport:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    out_dir: Path | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def run_batch(slides: list[str], model: str | Path, out_dir: str | Path, *, backend: str = "auto",
              device: str = "auto", workers: int = 0, overwrite: bool = False,
              review_db: str | None = None, mpp: float | None = None,
              hpf_area_mm2: float = 0.237, batch: int | None = None,
              console: Any = None, ray_address: str | None = None, gpus: int = 0,
              precision: str = "fp32", device_decode: str = "auto",
              audit_rate: float = DEFAULT_AUDIT_RATE, blind_share: float = DEFAULT_BLIND_SHARE,
              site: str | None = None, clinical_rules: str | None = None) -> BatchReport:
    """Run every slide; ``ray_address`` (auto | local | host:port | ray://host:port) or ``gpus`` > 0
    shards the slides over Ray workers (see :mod:`cellclf.pipeline.ray_workers`), else one local loop.
    ``audit_rate``: share of each slide's auto-accepted cells queued (blind, unmarked) for the
    running audit; ``site`` tags them for ``cellclf audit``; ``clinical_rules``: rules YAML."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = console or Console(stderr=True)
    if device_decode not in ("auto", "on", "off"):
        raise CellclfError(f"--gpu-decode must be auto, on or off, got {device_decode!r}")
    if not 0.0 <= audit_rate <= 1.0 or not 0.0 <= blind_share <= 1.0:
        raise CellclfError(f"--audit-rate and --blind-share must be in [0, 1], got {audit_rate} "
                           f"and {blind_share}")
    load_rules(clinical_rules)  # a bad rules file stops the run before any slide
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = expand_slides(slides, plain_images=mpp is not None)
    if not paths:
        raise CellclfError("no slides given: pass files, globs, folders or a text file of paths")
    distributed = bool(ray_address) or gpus > 0
    review_url = review_db or f"sqlite:///{out_dir.resolve() / 'review.sqlite'}"
    job = SlideJob(out_dir=out_dir.resolve() if distributed else out_dir, model=str(model),
                   backend=backend, device=device, workers=workers, mpp=mpp,
                   hpf_area_mm2=hpf_area_mm2, batch=batch, precision=precision,
                   device_decode=device_decode, audit_rate=audit_rate, blind_share=blind_share,
                   site=site, clinical_rules=str(clinical_rules) if clinical_rules else None)
    if distributed:  # the workers load the engine; the driver only checks the model and store
        engine = None
        store = open_store(review_url, load_card(model))
        store.close()
    else:
        engine = load_engine(model, backend=backend, device=device, batch=batch,
                             precision=precision)
        store = open_store(review_url, engine.card)
    manifest = Manifest(out_dir / "manifest.csv")
    report = BatchReport(out_dir=out_dir)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        batch_task = bar.add_task("slides", total=len(paths))
        todo = []
        taken: set[str] = set()
        for index, path in enumerate(paths):
            slide_id = slide_id_for(path, taken)
            taken.add(slide_id)
            if not overwrite and (out_dir / slide_id / "summary.json").exists():
                prev = manifest.get(slide_id)
                if prev is None or prev.status != "done":  # killed after the rename: finish the row
                    manifest.update(ManifestRow(slide_id, str(path), "done",
                                                finished_at=utc_now(), reason="recovered"))
                report.skipped += 1
                bar.advance(batch_task)
            else:
                todo.append((index, path, slide_id))

        def record(outcome: SlideOutcome, path: Path) -> None:
            _record(outcome, path, manifest, report, console, out_dir)
            bar.advance(batch_task)

        if distributed:
            run_on_ray(job, todo, review_url, record, console=console, address=ray_address,
                       gpus=gpus)
            return report
        versions = software_versions()
        for index, path, slide_id in todo:
            slide_task = bar.add_task(f"  {slide_id}", total=None)

            def tick(i: int, n: int, _task=slide_task) -> None:
                bar.update(_task, completed=i, total=n)

            outcome = process_slide(job, path, slide_id, index, engine, store, versions, tick)
            bar.remove_task(slide_task)
            record(outcome, path)
    return report


def _record(outcome: SlideOutcome, path: Path, manifest: Manifest, report: BatchReport,
            console: Any, out_dir: Path) -> None:
    """The driver's side of one finished slide: its manifest row, a console line, the tallies."""
    row = outcome.row
    sid = row.slide_id
    manifest.update(row)
    if row.status == "done":
        counts = outcome.counts or {}
        console.print(f"[green]done[/] {sid}: {row.n_cells} cells, "
                      + ", ".join(f"{k} {v['total']} ({v['accepted']} auto)"
                                  for k, v in counts.items() if k != outcome.other_class)
                      + f", {row.n_review} to review, {row.n_audited} audited"
                      + (f"; {escape(row.clinical_call)}" if row.clinical_call else "")
                      + f" → {out_dir / sid / 'report.html'}")
        if outcome.ood_reasons:
            console.print(f"[yellow]warning[/] {sid} looks unlike the calibration slides: "
                          + escape("; ".join(outcome.ood_reasons)) + f"; {OOD_ACTION}.",
                          soft_wrap=True)
        report.done += 1
    else:
        console.print(f"[red]failed[/] {sid}: {escape(row.reason)}", soft_wrap=True)
        report.failed += 1

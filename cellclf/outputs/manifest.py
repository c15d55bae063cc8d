"""The batch manifest: one status row per slide of an ``cellclf infer`` run, rewritten atomically.

Sits at the end of the flow, beside the per-slide result folders: ``DIR/manifest.csv`` says for each
slide whether it is ``done`` or ``failed`` (with the reason), so a rerun skips finished slides and a
failed slide never stops the batch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from cellclf.errors import CellclfError
from cellclf.outputs.atomic import atomic_write_text


@dataclass
class ManifestRow:
    slide_id: str
    path: str
    status: str  # done | failed
    reason: str = ""
    n_cells: int = 0
    n_review: int = 0
    seconds: float = 0.0
    finished_at: str = ""
    n_audited: int = 0  # auto-accepted cells queued for the running audit
    clinical_call: str = ""  # "rule: status [low, high]; …" (summary.json has the details)


FIELDS = [f.name for f in fields(ManifestRow)]
STATUSES = ("done", "failed")


def slide_id_for(path: Path, taken: set[str]) -> str:
    """A file-system-safe id from the slide's stem; a short hash of the path resolves collisions."""
    stem = path.name
    for suffix in (".ome.tif", ".ome.tiff"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = path.stem
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "slide"
    if base not in taken:
        return base
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{base}-{digest}"


class Manifest:
    """Rows keyed by slide id; every update rewrites the CSV atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: dict[str, ManifestRow] = {}
        if self.path.exists():
            try:
                with self.path.open(newline="", encoding="utf-8") as fh:
                    reader = csv.DictReader(fh)
                    lacking = [f for f in ("slide_id", "path", "status")
                               if f not in (reader.fieldnames or [])]
                    if lacking:
                        raise ValueError(f"its header lacks {lacking}")
                    for rec in reader:
                        row = ManifestRow(
                            slide_id=rec["slide_id"], path=rec["path"], status=rec["status"],
                            reason=rec.get("reason") or "", n_cells=int(rec.get("n_cells") or 0),
                            n_review=int(rec.get("n_review") or 0),
                            seconds=float(rec.get("seconds") or 0.0),
                            finished_at=rec.get("finished_at") or "",
                            n_audited=int(rec.get("n_audited") or 0),
                            clinical_call=rec.get("clinical_call") or "")
                        if not isinstance(row.slide_id, str) or row.status not in STATUSES:
                            raise ValueError(f"status {row.status!r}")
                        self.rows[row.slide_id] = row
            except (KeyError, ValueError, TypeError, csv.Error, UnicodeDecodeError) as exc:
                raise CellclfError(
                    f"{self.path} is not a readable cellclf manifest ({type(exc).__name__}: "
                    f"{exc}): move it aside (e.g. to manifest.csv.bad) and run again; finished "
                    "slides are recognised by their summary.json and not redone") from exc

    def get(self, slide_id: str) -> ManifestRow | None:
        return self.rows.get(slide_id)

    def update(self, row: ManifestRow) -> None:
        self.rows[row.slide_id] = row
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS)
        writer.writeheader()
        for r in self.rows.values():
            writer.writerow(asdict(r))
        atomic_write_text(self.path, buf.getvalue())

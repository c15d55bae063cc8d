"""Value types of the review queue: what inference hands in, what the store hands out.

Shared by :mod:`cellclf.review.store` (which re-exports them), the web app, export and finalize.
No database access and no web imports here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from cellclf.review.schema import ReviewStoreError

CANT_TELL = "cant_tell"
NOT_A_CELL = "not_a_cell"  # a label of labelling mode only (a detector candidate that is no cell)
TO_LABEL = "to_label"  # reason of a cell `cellclf label` chose to label (its label trains)
HELD_ASIDE = "held_aside"  # reason of a cell `cellclf label` drew at random (never trains)
REASONS = ("low_confidence", "uncertified_class", "ood_slide", TO_LABEL, HELD_ASIDE)
MODES = ("review", "labelling")  # labelling: `cellclf label` projects (adds the not-a-cell label)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"


def image_media_type(data: bytes) -> str | None:
    """``image/png`` or ``image/jpeg`` by the file signature; None for anything else."""
    head = bytes(data[:8])
    if head == PNG_SIGNATURE:
        return "image/png"
    if head[:3] == JPEG_SIGNATURE:
        return "image/jpeg"
    return None


class LeaseError(ReviewStoreError):
    """A label or undo was refused: the cell is not held by this reviewer (or is held by another)."""


@dataclass
class ReviewItem:
    """One gated cell as batch inference hands it to the queue.

    ``context_image`` is a larger view *centred on the cell* (the UI marks the centre) and
    ``crop_png`` the model's input crop, each PNG or JPEG (the names are historical; batch
    inference stores JPEG for both, which keeps a queued cell under 10 KB, and the slide's own
    tiles are JPEG already). ``image_mpp``: their µm per pixel (the model's); ``slide_mpp``: the
    slide's level-0 µm per pixel, which lets the app cut native-resolution views from
    ``slide_path`` while the slide is reachable. ``(slide_id, cell_id)`` identifies the cell;
    adding it again is a no-op. Higher ``priority`` = more doubtful = served first.
    """

    slide_id: str
    cell_id: int
    x: float
    y: float
    predicted: str
    probs: dict[str, float]
    conformal_set: list[str]
    reason: str
    priority: float
    crop_png: bytes
    context_image: bytes  # PNG or JPEG (stored in the images table's context_png column)
    slide_path: str | None = None
    audit: bool = False  # an auto-accepted cell sampled for the running audit (reviewer not told)
    blind: bool = False  # the UI hides the model's answer until the reviewer has answered
    site: str | None = None  # site / scanner tag for `cellclf audit`
    image_mpp: float | None = None
    slide_mpp: float | None = None


@dataclass(frozen=True)
class Item:
    """A queued cell as the store returns it (no images; fetch them with :meth:`image`)."""

    id: int
    slide_id: str
    cell_id: int
    x: float
    y: float
    predicted: str
    probs: dict[str, float]
    conformal_set: list[str]
    reason: str
    priority: float
    slide_path: str | None
    claimed_by: str | None
    lease_until: float | None
    n_labels: int
    label: str | None = None  # the asking reviewer's current label, when known
    blind: bool = False  # hide the model's answer until this reviewer has answered
    image_mpp: float | None = None  # µm/px of the stored images (None: queued before v4)
    slide_mpp: float | None = None  # the slide's level-0 µm/px (None: queued before v4)

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        return sorted(self.probs.items(), key=lambda kv: -kv[1])[:k]


@dataclass(frozen=True)
class FinalLabel:
    """The outcome of review for one cell (see :meth:`ReviewStore.final_labels`)."""

    item_id: int
    slide_id: str
    cell_id: int
    x: float
    y: float
    predicted: str
    label: str | None          # agreed label (a class or cant_tell); None while pending/disputed
    status: str                # done | pending | disputed
    votes: dict[str, str] = field(default_factory=dict)  # reviewer -> current label


def consensus(votes: Sequence[str], required: int) -> tuple[str | None, str]:
    """Final label and status from the reviewers' current labels (pure).

    Fewer than ``required`` votes → ``(None, "pending")``; all equal → ``(label, "done")``;
    otherwise ``(None, "disputed")``.
    """
    if len(votes) < required or not votes:
        return None, "pending"
    if len(set(votes)) == 1:
        return votes[0], "done"
    return None, "disputed"


def check_class_list(classes: list[str]) -> None:
    """ReviewStoreError unless the names are unique, non-empty and not a reserved label."""
    if not classes or len(set(classes)) != len(classes) or {CANT_TELL, NOT_A_CELL} & set(classes):
        raise ReviewStoreError(f"invalid class list {classes}: names must be unique, non-empty "
                               f"and not {CANT_TELL!r} or {NOT_A_CELL!r}")


def labels_for(classes: list[str], mode: str) -> list[str]:
    """The labels a reviewer may give: the classes, can't tell, and in labelling mode also
    not a cell."""
    return [*classes, CANT_TELL] + ([NOT_A_CELL] if mode == "labelling" else [])


def check_item(it: ReviewItem, classes: list[str]) -> None:
    """ReviewStoreError naming the cell unless ``it`` fits a store of ``classes``."""
    where = f"review item (slide {it.slide_id!r}, cell {it.cell_id})"
    if not it.slide_id:
        raise ReviewStoreError(f"{where}: slide_id is empty")
    if it.predicted not in classes:
        raise ReviewStoreError(f"{where}: predicted {it.predicted!r} is not one of the "
                               f"store's classes {classes}")
    if it.reason not in REASONS:
        raise ReviewStoreError(f"{where}: reason {it.reason!r} is not one of {REASONS}")
    unknown = (set(it.probs) | set(it.conformal_set)) - set(classes)
    if unknown:
        raise ReviewStoreError(f"{where}: unknown classes {sorted(unknown)} in probs or "
                               "conformal_set")
    if image_media_type(it.crop_png) is None:
        raise ReviewStoreError(f"{where}: crop_png is not a PNG or JPEG image")
    for name in ("image_mpp", "slide_mpp"):
        value = getattr(it, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ReviewStoreError(f"{where}: {name} must be a positive number of µm per pixel "
                                   f"or None, got {value!r}")
    if it.context_image and image_media_type(it.context_image) is None:
        raise ReviewStoreError(f"{where}: context_image is neither empty nor a PNG/JPEG image")

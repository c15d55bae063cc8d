"""Consistency checks between a bundle's card.json and its ONNX graphs, run before a graph is used.

Sits at the start of inference, between :func:`cellclf.card.load_card` (which validates the card on
its own) and the onnxruntime session: the graph bakes in the class order, the crop size, the working
mpp and the temperature (:mod:`cellclf.model.onnx_export` stores the card it was exported from in the
graph's metadata under ``cellclf_card`` and the class list under ``cellclf_classes``, and records the
file's sha256 in card.json's ``onnx`` section). A card edited or replaced after export would make
the engine report one class's cells as another's, so every mismatch is a :class:`BundleError`
that names the files and says how to fix it. Pure functions over dicts and paths (no onnxruntime).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cellclf.card import file_sha256
from cellclf.errors import BundleError


def check_onnx_sha256(card: dict[str, Any], onnx_path: Path, section: str = "onnx") -> None:
    """The graph file is the one card.json recorded at export (``card[section]["sha256"]``).

    A missing record or a different digest (edited card, swapped or truncated file) is refused."""
    root = onnx_path.parent
    flag = " --int8" if section == "int8" else ""
    record = card.get(section) if isinstance(card.get(section), dict) else None
    expected = (record or {}).get("sha256")
    if not isinstance(expected, str) or len(expected) != 64:
        raise BundleError(f"{root / 'card.json'} records no sha256 for {onnx_path.name}, so the "
                          f"graph cannot be checked against the card: run `cellclf export "
                          f"{root}{flag}` to export it again (this records its checksum)")
    actual = file_sha256(onnx_path)
    if actual != expected.lower():
        raise BundleError(f"{onnx_path} does not match the sha256 recorded in {root / 'card.json'} "
                          f"({actual[:12]}… ≠ {expected[:12]}…): the file was replaced, truncated "
                          f"or the card edited; run `cellclf export {root}{flag}` again, or restore "
                          "the bundle as it was shipped")


def check_onnx_matches_card(meta_card: dict[str, Any], card: dict[str, Any],
                            onnx_path: Path) -> None:
    """What the graph was exported with (its metadata card) equals what card.json says: class
    order, crop size and working mpp. The temperature is checked by the engine itself."""
    root = onnx_path.parent
    fix = (f"run `cellclf export {root}` to export the graph from this card again, or restore "
           "the card.json that came with the graph")
    graph_classes = list(meta_card.get("classes") or [])
    card_classes = list(card.get("classes") or [])
    if graph_classes != card_classes:
        raise BundleError(f"{onnx_path} outputs the classes {graph_classes} but "
                          f"{root / 'card.json'} lists {card_classes}: counts would be reported "
                          f"under the wrong class names; {fix}")
    for key, unit in (("crop_px", "px"), ("mpp", "µm/px")):
        a, b = meta_card.get(key), card.get(key)
        if not _same_number(a, b):
            raise BundleError(f"{onnx_path} was exported with {key} = {a} {unit} but "
                              f"{root / 'card.json'} says {b} {unit}; {fix}")


def metadata_card(custom_metadata: dict[str, str], onnx_path: Path) -> dict[str, Any]:
    """The card stored in a graph's custom metadata (``cellclf_card``), validated as a JSON object;
    its ``cellclf_classes`` entry, when present, must agree with it."""
    raw = custom_metadata.get("cellclf_card")
    if raw is None:
        raise BundleError(f"{onnx_path} carries no cellclf card in its metadata: export it with "
                          f"`cellclf export {onnx_path.parent}`")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{onnx_path}: its cellclf_card metadata is not valid JSON ({exc}); "
                          f"run `cellclf export {onnx_path.parent}` again") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{onnx_path}: its cellclf_card metadata is not a JSON object; "
                          f"run `cellclf export {onnx_path.parent}` again")
    listed = custom_metadata.get("cellclf_classes")
    if listed is not None:
        try:
            classes = json.loads(listed)
        except json.JSONDecodeError:
            classes = None
        if classes != meta.get("classes"):
            raise BundleError(f"{onnx_path}: its metadata lists the classes {listed} and "
                              f"{meta.get('classes')} in two places; run `cellclf export "
                              f"{onnx_path.parent}` again")
    return meta


def _same_number(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return a == b


def check_graph(card: dict[str, Any], meta_card: dict[str, Any] | None, onnx_path: Path,
                precision: str = "fp32") -> None:
    """Every check of one graph before use: the recorded sha256 when ``onnx_path`` is the file the
    card's ``onnx`` (fp32) or ``int8`` section names; then, with ``meta_card`` (the graph's own
    metadata), class order, crop size and mpp."""
    section = "int8" if precision == "int8" else "onnx"
    record = card.get(section) if isinstance(card.get(section), dict) else {}
    default_file = "model.int8.onnx" if section == "int8" else "model.onnx"
    if onnx_path.name == record.get("file", default_file):
        check_onnx_sha256(card, onnx_path, section)
    if meta_card is not None:
        check_onnx_matches_card(meta_card, card, onnx_path)

"""int8 variant of the ONNX export: ``cellclf export --int8`` → ``model.int8.onnx`` with its own gate.

Sits beside :mod:`cellclf.model.onnx_export`, after calibration. The fp32 deployment graph is quantised with
onnxruntime (static QDQ: int8 per-channel weights, uint8 per-tensor activations, MinMax ranges).
The activation ranges are calibrated on crops of slides the gate never sees (the training slides
by default), so the gate's calibration slides stay independent of the quantised model. The input
scaling, the classifier head and temperature/softmax stay fp32: logits and probabilities are not
quantised (a quantised softmax caps probabilities at 255/256, below the gate's thresholds).

int8 probabilities differ from fp32 ones (max |Δp| ≈ 0.2 on the shipped model), so the fp32 gate's
thresholds do not hold for them. The int8 model gets its own temperature, gate and conformal sets,
fitted like ``cellclf calibrate`` on its own probabilities of the calibration slides, kept in
card.json's ``int8`` section and in the int8 file's metadata; ``OnnxEngine(precision="int8")`` uses
them and refuses an int8 file without them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cellclf.annotations.labelled_data import ClassMap, discover, load_points
from cellclf.calibration.bundle_gate import training_slide_ids
from cellclf.card import Card, bundle_paths, file_sha256, load_card
from cellclf.detect.slide_detection import detect_slide
from cellclf.errors import BundleError
from cellclf.evaluation.evaluate import CellTable, classification_metrics, slide_table
from cellclf.evaluation.gate_metrics import gated_rows
from cellclf.gate.conformal import fit_aps
from cellclf.gate.temperature import ece, fit_temperature, softmax
from cellclf.gate.thresholds import fit_gate
from cellclf.model.onnx_export import export_onnx, set_metadata
from cellclf.outputs.atomic import atomic_write_json
from cellclf.wsi.crops import extract_crops
from cellclf.wsi.slide import Slide

INT8_FILE = "model.int8.onnx"
CALIB_BATCH = 64


def slide_crops(data: str | Path, card: Card, workers: int = 0, progress: bool = True,
                max_slides: int | None = None) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
    """(slide entry, candidate centres level-0, crops) for the slides of DATA, as inference cuts them."""
    entries = discover(data).entries
    if max_slides is not None and len(entries) > max_slides:
        entries = [entries[i] for i in np.linspace(0, len(entries) - 1, max_slides).round().astype(int)]
    for e in entries:
        cands = detect_slide(e.slide, mpp=e.mpp, work_mpp=card.mpp, workers=workers, progress=progress)
        yield e, cands, extract_crops(e.slide, cands, card.mpp, card.crop_px, mpp=e.mpp, workers=workers)


def sample_crops(data: str | Path, card: Card, n: int = 1024, max_slides: int = 8, workers: int = 0,
                 progress: bool = True, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """About ``n`` candidate crops drawn evenly from up to ``max_slides`` slides of DATA."""
    rng = np.random.default_rng(seed)
    parts, ids = [], []
    chunks = list(slide_crops(data, card, workers, progress, max_slides))
    per = max(1, -(-n // max(1, len(chunks))))
    for e, _, crops in chunks:
        if len(crops):
            parts.append(crops[rng.choice(len(crops), min(per, len(crops)), replace=False)])
            ids.append(e.slide_id)
    if not parts:
        raise BundleError(f"{data}: no cell candidates found to calibrate the int8 ranges on")
    return np.concatenate(parts)[:n], ids


def fp32_nodes(proto: Any) -> list[str]:
    """Nodes to keep in fp32: the input scaling (first Conv, fed by the graph input through
    Transpose/Cast), the classifier head (last Gemm/MatMul) and everything after it."""
    nodes = list(proto.graph.node)
    keep: list[str] = []
    produced = {o: n for n in nodes for o in n.output}
    first = next((n for n in nodes if n.op_type == "Conv"), None)
    src = produced.get(first.input[0]) if first is not None else None
    while src is not None and src.op_type in ("Transpose", "Cast"):
        src = produced.get(src.input[0])
    if first is not None and src is None:  # fed straight from the graph input
        keep.append(first.name)
    heads = [n for n in nodes if n.op_type in ("Gemm", "MatMul")]
    if heads:
        tainted = set(heads[-1].output)
        keep.append(heads[-1].name)
        for n in nodes[nodes.index(heads[-1]) + 1:]:
            if tainted & set(n.input):
                tainted.update(n.output)
                keep.append(n.name)
    return keep


def quantize_graph(src: Path, dst: Path, crops: np.ndarray, keep_fp32: list[str],
                   per_channel: bool = True) -> None:
    """Static QDQ quantisation of ``src`` into ``dst`` with ``crops`` for the activation ranges."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i >= len(crops):
                return None
            batch = np.ascontiguousarray(crops[self.i:self.i + CALIB_BATCH])
            self.i += CALIB_BATCH
            return {"crops": batch}

    pre = dst.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre))
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=keep_fp32,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        pre.unlink(missing_ok=True)


def set_temperature(proto: Any, temperature: float) -> None:
    """Set the graph's ``probs = softmax(logits × 1/T)`` multiplier to 1/``temperature``."""
    from onnx import numpy_helper

    produced = {o: n for n in proto.graph.node for o in n.output}
    inits = {i.name: i for i in proto.graph.initializer}
    soft = [n for n in proto.graph.node if n.op_type == "Softmax"]
    mul = produced.get(soft[-1].input[0]) if soft else None
    name = next((i for i in (mul.input if mul is not None and mul.op_type == "Mul" else [])
                 if i in inits), None)
    if name is None:
        raise BundleError("int8 graph: no temperature multiplier before the softmax (export changed?)")
    inits[name].CopyFrom(numpy_helper.from_array(np.array(1.0 / temperature, np.float32), name))


def _logits_fn(path: Path, batch: int = 256) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    def run(crops: np.ndarray) -> np.ndarray:
        out = [sess.run(["logits"], {"crops": np.ascontiguousarray(crops[s:s + batch])})[0]
               for s in range(0, len(crops), batch)]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    return run


def labelled_logits(data: str | Path, card: Card, runs: dict[str, Any], workers: int = 0,
                    progress: bool = True) -> tuple[dict[str, Any], list[str]]:
    """Per backend in ``runs`` (name → crops→logits): the cell table over DATA's slides with truth."""
    classes = tuple(card.classes)
    other = classes.index(card.other_class)
    cmap = ClassMap(classes, card.other_class, {}, "other")
    tables: dict[str, list] = {k: [] for k in runs}
    ids = []
    for e, cands, crops in slide_crops(data, card, workers, progress):
        pts = load_points(e, "px")
        with Slide(e.slide, mpp=e.mpp) as s:
            slide_mpp = s.mpp
        truth0, truth_idx = pts.level0(slide_mpp), cmap.indices(pts.names, str(pts.source))
        ids.append(e.slide_id)
        for k, fn in runs.items():
            lg = fn(crops) if len(crops) else np.zeros((0, len(classes)), np.float32)
            tables[k].append(slide_table(e.slide_id, cands, lg, truth0, truth_idx, pts.ambiguous,
                                         classes, other, 4.0 / slide_mpp, 1.0))
    return {k: CellTable.concat(v, classes) for k, v in tables.items()}, ids


def fit_int8_gate(card: Card, logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Temperature, gate and conformal sets for int8 logits, with the fp32 gate's settings."""
    g = dict(card.gate or {})
    temperature = fit_temperature(logits, labels)
    probs = softmax(logits, temperature)
    gate = fit_gate(probs, labels, list(card.classes), alpha=float(g.get("alpha", 0.01)),
                    delta=float(g.get("delta", 0.05)), temperature=temperature,
                    alpha_per_class=g.get("alpha_per_class") or None, beta=g.get("beta"),
                    other_class=card.other_class)
    alpha_set = float((card.get("calibration") or {}).get("alpha_set", 0.1))
    aps = fit_aps(probs, labels, list(card.classes), alpha_set=alpha_set)
    return {"temperature": float(temperature), "gate": gate.to_dict(), "conformal": aps.to_dict(),
            "ece_before": ece(softmax(logits, 1.0), labels), "ece_after": ece(probs, labels),
            "alpha_set": alpha_set}


def _data_dir(given: str | Path | None, section: dict | None, what: str, option: str) -> Path:
    path = Path(given) if given else Path(str((section or {}).get("data", "")))
    if not str(path) or not path.exists():
        raise BundleError(f"int8 export needs {what} slides with truth: {path or 'none recorded'} "
                          f"not found; pass {option} DIR")
    return path


def export_int8(bundle: str | Path, data: str | Path | None = None,
                quant_data: str | Path | None = None, n_quant: int = 1024, workers: int = 0,
                progress: bool = True) -> dict[str, Any]:
    """Write ``model.int8.onnx`` and card.json's ``int8`` section (module docstring); returns it.

    ``data``: calibration slides for the int8 gate (default: the card's calibration data);
    ``quant_data``: slides for the activation ranges (default: the card's training data)."""
    import onnx

    paths = bundle_paths(bundle)
    card = load_card(paths.root)
    if not card.gate:
        raise BundleError(f"{paths.root} has no gate: run `cellclf calibrate` before `--int8`")
    data = _data_dir(data, card.get("calibration"), "calibration", "--data")
    quant_data = _data_dir(quant_data, card.training, "range-calibration", "--quant-data")
    with tempfile.TemporaryDirectory(prefix="cellclf-int8-") as tmp:
        fp32 = export_onnx(paths.root, out=Path(tmp) / "fp32.onnx")
        crops, quant_ids = sample_crops(quant_data, card, n_quant, workers=workers, progress=progress)
        keep = fp32_nodes(onnx.load(str(fp32)))
        int8_tmp = Path(tmp) / INT8_FILE
        quantize_graph(fp32, int8_tmp, crops, keep)
        tables, cal_ids = labelled_logits(data, card, {"fp32": _logits_fn(fp32),
                                                       "int8": _logits_fn(int8_tmp)},
                                          workers, progress)
        clash = sorted((set(cal_ids) & set(quant_ids)) | (set(cal_ids) & training_slide_ids(card)))
        if clash:
            raise BundleError(f"calibration slides {clash[:5]} were also used for training or the "
                              "int8 ranges: the int8 gate needs slides the model never saw")
        logits, labels = gated_rows(tables["int8"])
        logits32, _ = gated_rows(tables["fp32"])
        if len(labels) == 0:
            raise BundleError(f"{data}: no detected cells to calibrate the int8 gate on")
        fitted = fit_int8_gate(card, logits, labels)

        t32 = float(card.temperature)
        p8, p32 = softmax(logits, fitted["temperature"]), softmax(logits32, t32)
        f1 = {k: classification_metrics(t.truth, t.pred, list(card.classes),
                                        card.other_class)["macro_f1"] for k, t in tables.items()}
        proto = onnx.load(str(int8_tmp))
        set_temperature(proto, fitted["temperature"])
        section = {
            "file": INT8_FILE, "precision": "int8", "source_sha256": card.sha256,
            "temperature": fitted["temperature"], "gate": fitted["gate"],
            "conformal": fitted["conformal"],
            "calibration": {"data": str(data), "slides": cal_ids, "n_cells": int(len(labels)),
                            "date": datetime.now(UTC).isoformat(timespec="seconds"),
                            "ece_before": fitted["ece_before"], "ece_after": fitted["ece_after"],
                            "alpha_set": fitted["alpha_set"]},
            "quantization": {"tool": f"onnxruntime {_ort_version()} quantize_static", "format": "QDQ",
                             "weights": "int8 per-channel", "activations": "uint8 per-tensor",
                             "ranges": "MinMax", "data": str(quant_data), "slides": quant_ids,
                             "n_crops": int(len(crops)), "fp32_nodes": keep},
            "agreement": {"data": str(data), "n_cells": int(len(labels)),
                          "argmax_agreement": float((p8.argmax(1) == p32.argmax(1)).mean()),
                          "max_abs_dprob": float(np.abs(p8 - p32).max()),
                          "macro_f1_fp32": f1["fp32"], "macro_f1_int8": f1["int8"]},
        }
        meta = card.to_dict()
        meta.update({k: section[k] for k in ("temperature", "gate", "conformal")})
        meta["onnx"] = {"precision": "int8", "source_sha256": card.sha256}
        set_metadata(proto, meta)
        final_tmp = paths.root / f".{INT8_FILE}.tmp"
        onnx.save(proto, str(final_tmp))
        os.replace(final_tmp, paths.root / INT8_FILE)
    section["sha256"] = file_sha256(paths.root / INT8_FILE)
    section["bytes"] = (paths.root / INT8_FILE).stat().st_size
    card_d = json.loads(paths.card.read_text())
    card_d["int8"] = section
    atomic_write_json(paths.card, card_d)
    return section


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__

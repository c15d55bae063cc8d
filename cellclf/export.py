"""ONNX export: the bundle's torch model → ``model.onnx`` that a torch-free site can run.

Sits after training and calibration. The graph takes ``uint8[N, crop_px, crop_px, 3]`` RGB and does
scaling, normalisation, the network, division by the card's temperature and softmax; outputs
``probs[N, K]`` and ``logits[N, K]`` (logits before the temperature). Batch is dynamic. The card goes
into the ONNX metadata (key ``cellclf_card``) and the file's sha256 into card.json (``onnx`` section).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cellclf.errors import BundleError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _wrapper(model: Any, temperature: float, fp16: bool) -> Any:
    import torch

    class ProbsAndLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("inv_t", torch.tensor(1.0 / temperature, dtype=torch.float32))

        def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.model(crops).float()
            probs = torch.softmax(logits * self.inv_t, dim=1)
            return probs, logits

    wrapped = ProbsAndLogits().eval()
    if fp16:
        wrapped.model.half()
    return wrapped


def export_onnx(bundle: str | Path, out: str | Path | None = None, opset: int = 18,
                fp16: bool = False) -> Path:
    """Write ``model.onnx`` (or ``out``) for the bundle; update card.json with its sha256."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnx
    import torch

    from cellclf.card import bundle_paths
    from cellclf.model import load_bundle

    paths = bundle_paths(bundle)
    model, card = load_bundle(paths.root)
    card_d = card.to_dict() if hasattr(card, "to_dict") else dict(card)
    temperature = float(card_d.get("temperature", 1.0))
    if fp16:
        # the preprocessing stays in fp32 inside the model; half() casts parameters and buffers
        pass
    wrapped = _wrapper(model.cpu().eval(), temperature, fp16)
    crop_px = int(card_d["crop_px"])
    example = torch.randint(0, 256, (2, crop_px, crop_px, 3), dtype=torch.uint8)
    out_path = Path(out) if out else paths.onnx
    tmp = out_path.with_suffix(".onnx.tmp")
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        torch.onnx.export(wrapped, (example,), str(tmp), input_names=["crops"],
                          output_names=["probs", "logits"], opset_version=opset,
                          dynamic_shapes=({0: batch},), external_data=False, dynamo=True,
                          verbose=False)
    except Exception as exc:  # noqa: BLE001 - surface exporter failures with context
        tmp.unlink(missing_ok=True)
        raise BundleError(f"ONNX export of {paths.root} failed: {exc}") from exc
    proto = onnx.load(str(tmp))
    meta_card = dict(card_d)
    meta_card["onnx"] = {"opset": opset, "fp16": fp16}
    for key, value in (("cellclf_card", json.dumps(meta_card, default=str)),
                       ("cellclf_classes", json.dumps(card_d["classes"]))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "cellclf"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    os.replace(tmp, out_path)
    if out is None:
        _record_in_card(paths.card, out_path, opset, fp16)
    return out_path


def _record_in_card(card_path: Path, onnx_path: Path, opset: int, fp16: bool) -> None:
    from cellclf.atomic import atomic_write_json

    data = json.loads(card_path.read_text())
    data["onnx"] = {"file": onnx_path.name, "sha256": sha256_file(onnx_path), "opset": opset,
                    "fp16": fp16, "bytes": onnx_path.stat().st_size}
    atomic_write_json(card_path, data)

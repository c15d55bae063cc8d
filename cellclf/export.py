"""ONNX export: the bundle's torch model → ``model.onnx`` that a torch-free site can run.

Sits after training and calibration. The graph takes ``uint8[N, crop_px, crop_px, 3]`` RGB and does
scaling, normalisation, the network, division by the card's temperature and softmax; outputs
``probs[N, K]`` and ``logits[N, K]`` (logits before the temperature). Batch is dynamic;
``fp16=True`` stores the weights in half precision (half the file, fp32 arithmetic). The card goes
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


def _wrapper(model: Any, temperature: float) -> Any:
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

    return ProbsAndLogits().eval()


def weights_to_fp16(proto: Any, min_elements: int = 16) -> int:
    """Store float32 weight tensors as float16 with a Cast back to float32 where they are used.

    Half the file size; the arithmetic stays fp32, so outputs equal the fp32 graph's up to the
    rounding of the weights (none at all for bundles saved with fp16 weights). A graph computing
    in fp16 throughout was measured at up to 5e-3 probability difference (fp16 activations), too
    far from the fp32 model for the gate's thresholds. Returns the number of tensors converted.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    casts, keep, n = [], [], 0
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= min_elements:
            arr = numpy_helper.to_array(init).astype(np.float16)
            half = numpy_helper.from_array(arr, name=f"{init.name}__fp16")
            keep.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                          name=f"{init.name}__cast"))
            n += 1
        else:
            keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return n


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
    wrapped = _wrapper(model.cpu().eval(), temperature)
    crop_px = int(card_d["crop_px"])
    example = torch.randint(0, 256, (2, crop_px, crop_px, 3), dtype=torch.uint8)
    out_path = Path(out) if out else paths.onnx
    tmp = out_path.with_suffix(".onnx.tmp")
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        torch.onnx.export(wrapped, (example,), str(tmp), input_names=["crops"],
                          output_names=["probs", "logits"], opset_version=opset,
                          dynamic_shapes=({0: batch},), external_data=False, dynamo=True,
                          optimize=not fp16,  # unfolded BN keeps conv weights fp16-exact
                          verbose=False)
    except Exception as exc:  # noqa: BLE001 - surface exporter failures with context
        tmp.unlink(missing_ok=True)
        raise BundleError(f"ONNX export of {paths.root} failed: {exc}") from exc
    proto = onnx.load(str(tmp))
    if fp16:
        weights_to_fp16(proto)
    meta_card = dict(card_d)
    meta_card["onnx"] = {"opset": opset, "fp16_weights": fp16}
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
                    "fp16_weights": fp16, "bytes": onnx_path.stat().st_size}
    atomic_write_json(card_path, data)

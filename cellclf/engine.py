"""One classification interface, two backends: ``classify(crops uint8 N×H×W×3) → probs (N, K)``.

Sits between crop cutting and the gate. ``TorchEngine`` runs the bundle's torch weights (CUDA with
bf16 autocast when available, else CPU fp32); ``OnnxEngine`` runs ``model.onnx`` with onnxruntime
(TensorRT or CUDA execution providers when installed, else CPU) and needs no torch. Both apply the
card's temperature and softmax, so everything downstream is identical whichever backend ran.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from cellclf.errors import BundleError


def read_card(bundle: str | Path) -> dict:
    from cellclf.card import bundle_paths

    paths = bundle_paths(bundle)
    if not paths.card.is_file():
        raise BundleError(f"{paths.card} not found: a bundle needs its card.json")
    return json.loads(paths.card.read_text())


class TorchEngine:
    """The bundle's torch model; bf16 autocast on CUDA, fp32 on CPU."""

    backend = "torch"

    def __init__(self, bundle: str | Path, device: str = "auto", batch: int | None = None):
        import torch

        from cellclf.model import load_bundle

        self.model, card = load_bundle(bundle)
        self.card = card.to_dict() if hasattr(card, "to_dict") else dict(card)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.batch = batch or (4096 if self.device.type == "cuda" else 256)
        self.classes = list(self.card["classes"])
        self.temperature = float(self.card.get("temperature", 1.0))

    def logits(self, crops: np.ndarray) -> np.ndarray:
        from cellclf.model import predict_logits

        if self.device.type != "cuda" or len(crops) == 0:
            return predict_logits(self.model, crops, batch=self.batch, device=self.device)
        return self._logits_cuda(np.asarray(crops))

    def _logits_cuda(self, crops: np.ndarray) -> np.ndarray:
        """Host crops → logits with the copies hidden behind the compute: each batch is copied into
        one of two pinned buffers and sent on a side stream while the previous batch runs."""
        import torch

        shape = (self.batch, *crops.shape[1:])
        if getattr(self, "_pinned", None) is None or self._pinned[0].shape != shape:
            self._pinned = [torch.empty(shape, dtype=torch.uint8).pin_memory() for _ in range(2)]
            self._copy_stream = torch.cuda.Stream(self.device)
        done = [None, None]  # copy-finished event per pinned buffer
        out = []
        compute = torch.cuda.current_stream(self.device)
        with torch.inference_mode():
            for k, s in enumerate(range(0, len(crops), self.batch)):
                chunk = crops[s:s + self.batch]
                buf = self._pinned[k % 2][:len(chunk)]
                if done[k % 2] is not None:
                    done[k % 2].synchronize()  # its previous copy has left the buffer
                buf.numpy()[...] = chunk
                with torch.cuda.stream(self._copy_stream):
                    x = buf.to(self.device, non_blocking=True)
                    done[k % 2] = self._copy_stream.record_event()
                compute.wait_stream(self._copy_stream)
                x.record_stream(compute)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out.append(self.model(x).float())
        return torch.cat(out).cpu().numpy()

    def classify(self, crops: np.ndarray) -> np.ndarray:
        from cellclf.calibrate import softmax

        return softmax(self.logits(crops), self.temperature).astype(np.float32)

    def classify_tensor(self, crops: Any) -> np.ndarray:
        """Probabilities (host numpy) for uint8 NHWC crops already in a torch tensor (ideally on
        this engine's device: crops cut on the GPU never cross PCIe); same maths as ``classify``."""
        import torch

        from cellclf.calibrate import softmax

        cuda = self.device.type == "cuda"
        out = []
        with torch.inference_mode():
            for s in range(0, len(crops), self.batch):
                x = crops[s:s + self.batch].to(self.device, non_blocking=cuda)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
                    out.append(self.model(x).float())
        if not out:
            return np.zeros((0, len(self.classes)), np.float32)
        return softmax(torch.cat(out).cpu().numpy(), self.temperature).astype(np.float32)


class OnnxEngine:
    """``model.onnx`` under onnxruntime; temperature and softmax are inside the graph."""

    backend = "onnx"

    def __init__(self, bundle: str | Path, device: str = "auto", batch: int = 256,
                 onnx_file: str | None = None):
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import onnxruntime as ort

        from cellclf.card import bundle_paths

        paths = bundle_paths(bundle)
        self.card = read_card(bundle)
        path = paths.root / onnx_file if onnx_file else paths.onnx
        if not path.is_file():
            raise BundleError(f"{path} not found: run `cellclf export {paths.root}` first")
        meta_card = onnx_card(path)
        t_graph = float(meta_card.get("temperature", 1.0))
        t_card = float(self.card.get("temperature", 1.0))
        if abs(t_graph - t_card) > 1e-6:
            raise BundleError(f"{path} was exported with temperature {t_graph} but card.json says "
                              f"{t_card} (recalibrated since?): run `cellclf export {paths.root}` again")
        available = ort.get_available_providers()
        wanted = ["CPUExecutionProvider"]
        if device != "cpu":
            wanted = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
                      if p in available] + wanted
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name
        self.batch = batch
        self.classes = list(self.card["classes"])

    def run(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, logits = [], []
        for s in range(0, len(crops), self.batch):
            p, lg = self.session.run(["probs", "logits"],
                                     {self.input_name: np.ascontiguousarray(crops[s:s + self.batch])})
            probs.append(p)
            logits.append(lg)
        k = len(self.classes)
        if not probs:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.float32)
        return np.concatenate(probs).astype(np.float32), np.concatenate(logits).astype(np.float32)

    def logits(self, crops: np.ndarray) -> np.ndarray:
        return self.run(crops)[1]

    def classify(self, crops: np.ndarray) -> np.ndarray:
        return self.run(crops)[0]


def onnx_card(path: str | Path) -> dict:
    """The card stored in an ONNX file's metadata (key ``cellclf_card``)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    if "cellclf_card" not in meta:
        raise BundleError(f"{path} carries no cellclf card in its metadata: export it with `cellclf export`")
    return json.loads(meta["cellclf_card"])


def torch_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def load_engine(bundle: str | Path, backend: str = "auto", device: str = "auto",
                batch: int | None = None) -> Any:
    """Pick a backend: torch on CUDA when present, else onnxruntime when the bundle has model.onnx,
    else torch on CPU. ``backend`` = torch | onnx forces one."""
    from cellclf.card import bundle_paths

    paths = bundle_paths(bundle)
    if backend not in ("auto", "torch", "onnx"):
        raise BundleError(f"unknown backend {backend!r}: use auto, torch or onnx")
    if backend == "auto":
        has_torch = torch_available()
        cuda = False
        if has_torch and device != "cpu":
            import torch

            cuda = torch.cuda.is_available()
        if cuda or (has_torch and not paths.onnx.is_file()):
            backend = "torch"
        elif paths.onnx.is_file():
            backend = "onnx"
        else:
            raise BundleError(f"{paths.root} has no model.onnx and torch is not installed: install "
                              "cellclf[train] or export the bundle on a machine with torch")
    if backend == "torch":
        if not torch_available():
            raise BundleError("--backend torch needs PyTorch, which is not installed: install "
                              "cellclf[train], or use --backend onnx")
        return TorchEngine(bundle, device=device, batch=batch)
    return OnnxEngine(bundle, device=device, batch=batch or 256)

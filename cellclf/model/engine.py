"""One classification interface, two backends: ``classify(crops uint8 N×H×W×3) → probs (N, K)``.

Sits between crop cutting and the gate. ``TorchEngine`` runs the bundle's torch weights (CUDA with
bf16 autocast when available, else CPU fp32); ``OnnxEngine`` runs ``model.onnx`` with onnxruntime
(TensorRT or CUDA execution providers when installed, else CPU) and needs no torch. Both apply the
card's temperature and softmax, so everything downstream is identical whichever backend ran.
``OnnxEngine(precision="int8")`` runs ``model.int8.onnx`` and hands downstream the int8 model's
own temperature and gate (``engine.card``), never the fp32 ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cellclf.card import Card, bundle_paths, load_card
from cellclf.errors import BundleError
from cellclf.gate.temperature import softmax
from cellclf.model.bundle_checks import check_graph, metadata_card


class Engine(Protocol):
    """What the pipeline, evaluation and calibration need of a classifier backend."""

    backend: str  # "torch" | "onnx"
    classes: list[str]  # probability columns, the card's order
    card: Card  # the card in force (an int8 graph's carries its own temperature and gate)

    def classify(self, crops: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 crops → (N, K) float32 probabilities (temperature applied)."""
        ...

    def logits(self, crops: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 crops → (N, K) float32 logits (before the temperature)."""
        ...


def bucket_size(n: int, batch: int) -> int:
    """Rows a CUDA forward pass of ``n`` crops runs on: ``n`` rounded up to a power of two (≥ 256,
    ≤ ``batch``). cuDNN builds an execution plan per input shape (about a millisecond per layer),
    so ragged batches are padded to a handful of shapes (rows are independent in eval mode)."""
    if n >= batch:
        return batch
    return min(batch, max(256, 1 << max(0, n - 1).bit_length()))


class TorchEngine:
    """The bundle's torch model; bf16 autocast on CUDA, fp32 on CPU."""

    backend = "torch"

    def __init__(self, bundle: str | Path, device: str = "auto", batch: int | None = None):
        import torch

        from cellclf.model.network import load_bundle

        self.model, self.card = load_bundle(bundle)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.batch = batch or (4096 if self.device.type == "cuda" else 256)
        self.classes = list(self.card.classes)
        self.temperature = float(self.card.temperature)
        if self.device.type == "cuda":
            self.warm_up()

    def logits(self, crops: np.ndarray) -> np.ndarray:
        from cellclf.model.network import predict_logits

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
                buf = self._pinned[k % 2][:bucket_size(len(chunk), self.batch)]
                if done[k % 2] is not None:
                    done[k % 2].synchronize()  # its previous copy has left the buffer
                buf[:len(chunk)].copy_(torch.from_numpy(np.ascontiguousarray(chunk)))  # threaded
                with torch.cuda.stream(self._copy_stream):
                    x = buf.to(self.device, non_blocking=True)
                    done[k % 2] = self._copy_stream.record_event()
                compute.wait_stream(self._copy_stream)
                x.record_stream(compute)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out.append(self.model(x)[:len(chunk)].float())
        return torch.cat(out).cpu().numpy()

    def classify(self, crops: np.ndarray) -> np.ndarray:
        return softmax(self.logits(crops), self.temperature).astype(np.float32)

    def warm_up(self) -> None:
        """Build the CUDA execution plans of every bucket size once (see :func:`bucket_size`)."""
        import torch

        if self.device.type != "cuda":
            return
        crop = int(self.card.crop_px)
        size = 256
        while True:
            self.classify_tensor(torch.full((min(size, self.batch), crop, crop, 3), 255,
                                            dtype=torch.uint8, device=self.device))
            if size >= self.batch:
                break
            size *= 2

    def classify_tensor(self, crops: Any) -> np.ndarray:
        """Probabilities (host numpy) for uint8 NHWC crops already in a torch tensor (ideally on
        this engine's device: crops cut on the GPU never cross PCIe); same maths as ``classify``."""
        import torch

        cuda = self.device.type == "cuda"
        out = []
        with torch.inference_mode():
            for s in range(0, len(crops), self.batch):
                x = crops[s:s + self.batch].to(self.device, non_blocking=cuda)
                n = len(x)
                if cuda and bucket_size(n, self.batch) > n:  # a few shapes only (see bucket_size)
                    pad = x.new_full((bucket_size(n, self.batch) - n, *x.shape[1:]), 255)
                    x = torch.cat((x, pad))
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
                    out.append(self.model(x)[:n].float())
        if not out:
            return np.zeros((0, len(self.classes)), np.float32)
        return softmax(torch.cat(out).cpu().numpy(), self.temperature).astype(np.float32)


PRECISIONS = ("fp32", "int8")


class OnnxEngine:
    """An exported graph under onnxruntime; temperature and softmax are inside the graph.

    ``precision="fp32"`` (default) runs ``model.onnx``; ``precision="int8"`` runs the quantised
    ``model.int8.onnx`` with the temperature, gate and conformal sets fitted on its own
    probabilities (card.json's ``int8`` section): ``self.card`` then carries those, so code
    downstream never applies the fp32 gate to int8 probabilities. An int8 file without its own
    gate, an int8 file loaded as fp32 (or the reverse) and an int8 file from other weights are
    refused. ``threads`` sets onnxruntime's intra-op threads (0 = one per physical core).
    ``spin``: onnxruntime's worker threads busy-wait between operators (its default). Off here:
    in a pipeline the reader, detector and review threads share the cores with the classifier,
    and spinning threads take the cycles they need (docs/benchmarks.md, whole job vs pipeline).
    """

    backend = "onnx"

    def __init__(self, bundle: str | Path, device: str = "auto", batch: int = 256,
                 onnx_file: str | None = None, precision: str = "fp32", threads: int = 0,
                 spin: bool = False):
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import onnxruntime as ort

        if precision not in PRECISIONS:
            raise BundleError(f"unknown precision {precision!r}: use fp32 or int8")
        paths = bundle_paths(bundle)
        card = load_card(paths.root)
        if precision == "int8":
            path, self.card = _int8_card(paths.root, card, onnx_file)
        else:
            path, self.card = (paths.root / onnx_file if onnx_file else paths.onnx), card
        if not path.is_file():
            flag = " --int8" if precision == "int8" else ""
            raise BundleError(f"{path} not found: run `cellclf export {paths.root}{flag}` first")
        check_graph(card, None, path, precision)  # sha256 first: a truncated file never loads
        available = ort.get_available_providers()
        wanted = ["CPUExecutionProvider"]
        if device != "cpu":
            wanted = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
                      if p in available] + wanted
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.session = _session(path, opts, wanted)  # one session: the metadata comes from it
        meta_card = metadata_card(self.session.get_modelmeta().custom_metadata_map, path)
        check_graph(card, meta_card, path, precision)
        graph_precision = (meta_card.get("onnx") or {}).get("precision", "fp32")
        if graph_precision != precision:
            raise BundleError(f"{path} is an {graph_precision} graph but precision {precision} was "
                              f"asked for: use precision {graph_precision} (--precision), so that "
                              "the gate fitted on that graph's own probabilities is used")
        if precision == "int8" and meta_card.get("sha256") != card.get("sha256"):
            raise BundleError(f"{path} was quantised from other weights than {paths.root}/model.pt "
                              f"(retrained since?): run `cellclf export {paths.root} --int8` again")
        t_graph = float(meta_card.get("temperature", 1.0))
        t_card = float(self.card.temperature)
        if abs(t_graph - t_card) > 1e-6:
            flag = " --int8" if precision == "int8" else ""
            raise BundleError(f"{path} was exported with temperature {t_graph} but card.json says "
                              f"{t_card} (recalibrated since?): run `cellclf export {paths.root}{flag}` "
                              "again")
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name
        self.batch = batch
        self.precision = precision
        self.path = path
        self.classes = list(self.card.classes)

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


def _int8_card(root: Path, card: Card, onnx_file: str | None) -> tuple[Path, Card]:
    """The int8 graph's path and the card to use with it: temperature, gate and conformal sets
    from card.json's ``int8`` section (fitted on int8 probabilities), never the fp32 ones."""
    section = card.get("int8")
    if not section:
        raise BundleError(f"{root} has no int8 model: run `cellclf export {root} --int8` (it "
                          "quantises the model and fits a gate on the int8 probabilities)")
    missing = [k for k in ("file", "temperature", "gate") if not section.get(k)]
    if missing:
        raise BundleError(f"{root}/card.json's int8 section lacks {missing}: the int8 model needs "
                          "its own gate (the fp32 thresholds do not hold for int8 probabilities); "
                          f"run `cellclf export {root} --int8` again")
    int8_card = card.replace(temperature=section["temperature"], gate=section["gate"],
                             extra={**card.extra, "conformal": section.get("conformal"),
                                    "precision": "int8"})
    return root / (onnx_file or section["file"]), int8_card


def _session(path: str | Path, opts: Any = None, providers: list[str] | None = None) -> Any:
    """An onnxruntime session of ``path``; a file it cannot read is a :class:`BundleError`."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
        raise BundleError(f"{path} is not a readable ONNX graph ({type(exc).__name__}): run "
                          f"`cellclf export {Path(path).parent}` again") from exc


def onnx_card(path: str | Path) -> dict:
    """The card stored in an ONNX file's metadata (key ``cellclf_card``)."""
    return metadata_card(_session(path).get_modelmeta().custom_metadata_map, Path(path))


def torch_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def load_engine(bundle: str | Path, backend: str = "auto", device: str = "auto",
                batch: int | None = None, precision: str = "fp32") -> Engine:
    """Pick a backend: torch on CUDA when present, else onnxruntime when the bundle has model.onnx,
    else torch on CPU. ``backend`` = torch | onnx forces one. ``precision="int8"`` runs
    ``model.int8.onnx`` with its own gate (onnxruntime only; see :class:`OnnxEngine`)."""
    paths = bundle_paths(bundle)
    if backend not in ("auto", "torch", "onnx"):
        raise BundleError(f"unknown backend {backend!r}: use auto, torch or onnx")
    if precision not in PRECISIONS:
        raise BundleError(f"unknown precision {precision!r}: use fp32 or int8")
    if precision == "int8":
        if backend == "torch":
            raise BundleError("precision int8 runs under onnxruntime only: use --backend onnx or auto")
        return OnnxEngine(bundle, device=device, batch=batch or 256, precision="int8")
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

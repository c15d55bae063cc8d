"""ONNX export: the bundle's torch model → ``model.onnx`` that a torch-free site can run.

Sits after training and calibration. The graph takes ``uint8[N, crop_px, crop_px, 3]`` RGB and does
scaling, normalisation, the network, division by the card's temperature and softmax; outputs
``probs[N, K]`` and ``logits[N, K]`` (logits before the temperature). Batch is dynamic. The card goes
into the ONNX metadata (key ``cellclf_card``) and the file's sha256 into card.json (``onnx`` section).

Before export the network is rewritten into an equivalent deployment form (:func:`deploy_model`;
same outputs up to fp32 rounding) that onnxruntime's CPU kernels run fast: batch norm folded into
the convolutions, RegNet's 8-wide grouped 3×3 convolutions widened to 16-wide ones with
block-diagonal (zero-filled) weights so onnxruntime's blocked NCHWc kernels take them (AVX-512
blocks 16 channels; 8-wide groups fall back to a slow generic path, measured 3-10× slower), global
average pooling as a plain mean, and the input scaling as a 1×1 per-channel convolution.
``fp16=True`` stores the weights in half precision (half the file, fp32 arithmetic). The int8
variant (``cellclf export --int8``) is built from this graph by :mod:`cellclf.calibration.int8`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from cellclf.card import bundle_paths, file_sha256
from cellclf.errors import BundleError
from cellclf.outputs.atomic import atomic_write_json

MIN_OPSET = 18  # the lowest opset torch's (dynamo) exporter writes
NCHWC_BLOCK = 16  # onnxruntime's NCHWc channel block on AVX-512 (8 on AVX2; 16 suits both)




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


# ---------------------------------------------------------------- deployment rewrite (torch)


def block_diagonal_groups(weight: Any, group_width: int, block: int, channels: int) -> Any:
    """Weights of a grouped conv with ``group_width``-wide groups → the same conv as ``block``-wide
    groups over ``channels`` (≥ the original, padded with zero filters): each new group holds
    ``block // group_width`` old groups on its diagonal and zeros elsewhere (pure; exact)."""
    import torch

    c_out = weight.shape[0]
    k = block // group_width
    out = torch.zeros((channels, block, *weight.shape[2:]), dtype=weight.dtype)
    for o in range(c_out):
        j = (o // group_width) % k  # position of o's old group inside its new group
        out[o, j * group_width:(j + 1) * group_width] = weight[o]
    return out


def _conv(like: Any, c_in: int, c_out: int, groups: int, weight: Any, bias: Any) -> Any:
    from torch import nn

    conv = nn.Conv2d(c_in, c_out, like.kernel_size, like.stride, like.padding, like.dilation,
                     groups, bias=True)
    conv.weight.data.copy_(weight)
    conv.bias.data.copy_(bias)
    return conv


def _pad(t: Any, n: int, dim: int) -> Any:
    import torch

    if t.shape[dim] >= n:
        return t
    shape = list(t.shape)
    shape[dim] = n - shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim)


def _bias(conv: Any) -> Any:
    return conv.bias.data if conv.bias is not None else conv.weight.data.new_zeros(conv.out_channels)


def _pad_bn(seq: Any, channels: int) -> None:
    """Pad the BatchNorm2d after a widened conv (when not folded): padded channels stay zero."""
    from torch import nn

    bn = seq[1] if len(seq) > 1 else None
    if not isinstance(bn, nn.BatchNorm2d) or bn.num_features >= channels:
        return
    new = nn.BatchNorm2d(channels, eps=bn.eps).eval()
    c = bn.num_features
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, name).data[:c] = getattr(bn, name).data
    new.weight.data[c:], new.bias.data[c:] = 0.0, 0.0
    new.running_mean.data[c:], new.running_var.data[c:] = 0.0, 1.0
    seq[1] = new


def fold_batchnorm(model: Any) -> int:
    """Fold every Conv2d → BatchNorm2d pair inside a Sequential (eval mode); returns the count."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    n = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
                n += 1
    return n


def widen_groups(model: Any, block: int = NCHWC_BLOCK) -> int:
    """RegNet bottlenecks (a: 1×1, b: grouped 3×3, se, c: 1×1; batch norm already folded) whose
    group width does not divide by ``block``: pad the bottleneck to a multiple of ``block``
    channels (zero filters in a, zero inputs in se.fc1 and c) and regroup b block-diagonally.
    Exact; returns the number of blocks rewritten."""
    n = 0
    for mod in model.modules():
        parts = mod._modules
        if not all(k in parts for k in ("a", "b", "c")):
            continue
        a, b, c = mod.a[0], mod.b[0], mod.c[0]
        width = b.in_channels // b.groups
        if b.groups == 1 or width % block == 0 or block % width or b.in_channels != b.out_channels:
            continue
        ch = -(-b.in_channels // block) * block
        mod.a[0] = _conv(a, a.in_channels, ch, 1, _pad(a.weight.data, ch, 0), _pad(_bias(a), ch, 0))
        mod.b[0] = _conv(b, ch, ch, ch // block,
                         block_diagonal_groups(b.weight.data, width, block, ch), _pad(_bias(b), ch, 0))
        _pad_bn(mod.a, ch)
        _pad_bn(mod.b, ch)
        if "se" in parts:
            se = mod.se
            se.fc1 = _conv(se.fc1, ch, se.fc1.out_channels, 1, _pad(se.fc1.weight.data, ch, 1),
                           _bias(se.fc1))
            se.fc2 = _conv(se.fc2, se.fc2.in_channels, ch, 1, _pad(se.fc2.weight.data, ch, 0),
                           _pad(_bias(se.fc2), ch, 0))
        mod.c[0] = _conv(c, ch, c.out_channels, 1, _pad(c.weight.data, ch, 1), _bias(c))
        n += 1
    return n


def deploy_model(model: Any, group_block: int = NCHWC_BLOCK, fold_bn: bool = True) -> Any:
    """An equivalent copy of a :class:`cellclf.model.network.CellClassifier` for export (module docstring);
    ``group_block=0`` leaves the grouped convolutions as they are; ``fold_bn=False`` keeps batch
    norm separate (weights stay as stored, e.g. fp16-exact; onnxruntime folds it at load)."""
    import torch
    from torch import nn

    class MeanPool(nn.Module):  # exports as ReduceMean (AdaptiveAvgPool2d(1) gives a Gather chain)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean((2, 3), keepdim=True)

    class ScaleConv(nn.Module):  # uint8 NHWC → normalised NCHW as one per-channel 1×1 conv
        def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("weight", scale.reshape(-1, 1, 1, 1).clone())
            self.register_buffer("bias", shift.reshape(-1).clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.permute(0, 3, 1, 2).to(self.weight.dtype)
            return nn.functional.conv2d(x, self.weight, self.bias, groups=self.weight.shape[0])

    m = copy.deepcopy(model).cpu().float().eval()
    if fold_bn:
        fold_batchnorm(m)
    if group_block:
        widen_groups(m, group_block)
    for mod in list(m.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size in (1, (1, 1)):
                setattr(mod, name, MeanPool())
    pre = getattr(m, "preprocess", None)
    if pre is not None and hasattr(pre, "scale") and hasattr(pre, "shift"):
        m.preprocess = ScaleConv(pre.scale, pre.shift)
    return m


# ---------------------------------------------------------------- ONNX


def weights_to_fp16(proto: Any, min_elements: int = 16) -> int:
    """Store float32 weight tensors as float16 with a Cast back to float32 where they are used.

    Half the file size; the arithmetic stays fp32, so outputs equal the fp32 graph's up to the
    rounding of the weights. A graph computing in fp16 throughout was measured at up to 5e-3
    probability difference (fp16 activations), too far from the fp32 model for the gate's
    thresholds. Returns the number of tensors converted.
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


def set_metadata(proto: Any, card_d: dict) -> None:
    """Store the card (and its class list) in the ONNX metadata, replacing earlier entries."""
    keep = [p for p in proto.metadata_props if p.key not in ("cellclf_card", "cellclf_classes")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in (("cellclf_card", json.dumps(card_d, default=str)),
                       ("cellclf_classes", json.dumps(card_d["classes"]))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def export_onnx(bundle: str | Path, out: str | Path | None = None, opset: int = 18,
                fp16: bool = False, group_block: int = NCHWC_BLOCK) -> Path:
    """Write ``model.onnx`` (or ``out``) for the bundle; update card.json with its sha256 when
    writing the bundle's own ``model.onnx``. ``group_block=0`` skips the group widening."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnx
    import torch

    from cellclf.model.network import load_bundle

    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= max_opset:
        raise BundleError(f"--opset {opset} is not supported: torch's ONNX exporter writes opset "
                          f"{MIN_OPSET} to {max_opset} (the installed onnx); onnxruntime ≥ 1.14 "
                          f"runs opset {MIN_OPSET}")
    paths = bundle_paths(bundle)
    model, card = load_bundle(paths.root)
    card_d = card.to_dict() if hasattr(card, "to_dict") else dict(card)
    temperature = float(card_d.get("temperature", 1.0))
    # fp16: keep batch norm unfolded so the stored (fp16) conv weights round-trip exactly
    wrapped = _wrapper(deploy_model(model, group_block, fold_bn=not fp16), temperature)
    crop_px = int(card_d["crop_px"])
    example = torch.randint(0, 256, (2, crop_px, crop_px, 3), dtype=torch.uint8)
    out_path = Path(out) if out else paths.onnx
    tmp = out_path.with_suffix(".onnx.tmp")
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        torch.onnx.export(wrapped, (example,), str(tmp), input_names=["crops"],
                          output_names=["probs", "logits"], opset_version=opset,
                          dynamic_shapes=({0: batch},), external_data=False, dynamo=True,
                          optimize=not fp16, verbose=False)
    except Exception as exc:  # noqa: BLE001 - surface exporter failures with context
        tmp.unlink(missing_ok=True)
        raise BundleError(f"ONNX export of {paths.root} failed: {exc}") from exc
    proto = onnx.load(str(tmp))
    written = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if written != opset:  # never record an opset the file does not have
        tmp.unlink(missing_ok=True)
        raise BundleError(f"the exporter wrote opset {written} when {opset} was asked for: use "
                          f"--opset {written}")
    if fp16:
        weights_to_fp16(proto)
    meta_card = dict(card_d)
    meta_card["onnx"] = {"opset": opset, "fp16_weights": fp16, "precision": "fp32",
                         "group_block": group_block}
    set_metadata(proto, meta_card)
    proto.producer_name = "cellclf"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    os.replace(tmp, out_path)
    if out is None:
        _record_in_card(paths.card, out_path, opset, fp16, group_block)
    return out_path


def _record_in_card(card_path: Path, onnx_path: Path, opset: int, fp16: bool,
                    group_block: int) -> None:
    data = json.loads(card_path.read_text())
    data["onnx"] = {"file": onnx_path.name, "sha256": file_sha256(onnx_path), "opset": opset,
                    "fp16_weights": fp16, "bytes": onnx_path.stat().st_size,
                    "precision": "fp32", "group_block": group_block}
    atomic_write_json(card_path, data)

"""The deployment rewrite before ONNX export: block-diagonal group widening (hand-computed), batch
norm folding, and exact equivalence of the rewritten RegNet with the original."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_block_diagonal_groups_hand_case():
    from cellclf.model.onnx_export import block_diagonal_groups

    # 3 groups of width 2 (6 channels) -> blocks of 4 over 8 channels (last group + 2 zero filters)
    w = torch.arange(1, 6 * 2 + 1, dtype=torch.float32).reshape(6, 2, 1, 1)
    out = block_diagonal_groups(w, group_width=2, block=4, channels=8)
    assert out.shape == (8, 4, 1, 1)
    expect = torch.zeros(8, 4)
    expect[0, 0:2], expect[1, 0:2] = w[0, :, 0, 0], w[1, :, 0, 0]  # old group 0: left half
    expect[2, 2:4], expect[3, 2:4] = w[2, :, 0, 0], w[3, :, 0, 0]  # old group 1: right half
    expect[4, 0:2], expect[5, 0:2] = w[4, :, 0, 0], w[5, :, 0, 0]  # old group 2: new group 1, left
    assert torch.equal(out[:, :, 0, 0], expect)  # rows 6, 7: zero filters


def test_widened_grouped_conv_is_the_same_conv():
    from cellclf.model.onnx_export import block_diagonal_groups

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=3, bias=False)  # width 8
    x = torch.randn(2, 24, 9, 9)
    wide = torch.nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=2, bias=False)  # width 16
    wide.weight.data = block_diagonal_groups(conv.weight.data, 8, 16, 32)
    y = wide(torch.cat([x, torch.zeros(2, 8, 9, 9)], 1))
    torch.testing.assert_close(y[:, :24], conv(x), rtol=0, atol=1e-5)
    assert y[:, 24:].abs().max() == 0


@pytest.fixture(scope="module")
def regnet():
    from cellclf.model.network import CellClassifier

    torch.manual_seed(0)
    m = CellClassifier("regnet_y_400mf", 4, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    for mod in m.modules():  # non-trivial batch-norm statistics, so folding has work to do
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.mark.slow
def test_deploy_model_equals_the_original(regnet):
    from cellclf.model.onnx_export import deploy_model

    crops = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (6, 64, 64, 3), np.uint8))
    dep = deploy_model(regnet)
    with torch.no_grad():
        ref, out = regnet(crops), dep(crops)
    assert ref.abs().max() > 0.1  # not a degenerate net
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in dep.modules())
    grouped = [m for m in dep.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1
               and m.groups != m.in_channels]
    assert grouped and all((m.in_channels // m.groups) % 16 == 0 for m in grouped)
    # the original is untouched (deploy_model works on a copy)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in regnet.modules())


def test_deploy_without_widening_keeps_groups(regnet):
    from cellclf.model.onnx_export import deploy_model

    dep = deploy_model(regnet, group_block=0)
    widths = {m.in_channels // m.groups for m in dep.modules()
              if isinstance(m, torch.nn.Conv2d) and 1 < m.groups < m.in_channels}
    assert widths == {8}


@pytest.mark.slow
def test_deploy_keeping_batchnorm_equals_the_original(regnet):
    """fp16 exports keep batch norm unfolded (stored weights stay exact): widening pads it too."""
    from cellclf.model.onnx_export import deploy_model

    crops = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (4, 64, 64, 3), np.uint8))
    dep = deploy_model(regnet, fold_bn=False)
    with torch.no_grad():
        ref, out = regnet(crops), dep(crops)
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))
    assert any(isinstance(m, torch.nn.BatchNorm2d) and m.num_features % 16 == 0
               and m.num_features not in (32, 48) for m in dep.modules())

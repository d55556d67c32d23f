"""Module hooks: what is captured is the named module's output, whatever the modules after it do in place."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models import capture


def test_capture_keeps_the_output_a_later_inplace_op_overwrites():
    torch.manual_seed(0)
    # bn -> ReLU(inplace) overwrites bn's output tensor, as in torchvision's ResNets
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(3))
    model.train()
    x = torch.randn(5, 1, 8, 8)
    model(x)  # materialise the lazy layer
    with torch.no_grad():
        expected = model[1](model[0](x))  # computed independently, before any in-place op
    assert (expected < 0).any()
    with capture(model, ["1"]) as feats:
        out = model(x)
    torch.testing.assert_close(feats["1"], expected)
    # and it still carries gradients to the layers before it (students are hooked the same way)
    (feats["1"].sum() + out.sum()).backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0

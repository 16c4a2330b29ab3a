"""The CPU protocol's model (resnet9_cpu): what FST and the benchmark rely on."""
from __future__ import annotations

import torch

from fst_plugin.core import find_head
from fst_plugin.models import build_model
from fst_plugin.models import resnet9 as resnet9_module


def test_resnet9_cpu_head_features_and_layout():
    model = build_model("resnet9_cpu", 10).eval()
    assert find_head(model, 10).names == ["linear"] and model.linear.in_features == 256
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats, logits = model.features(x), model(x)
    assert feats.dtype == torch.float32 and feats.shape == (3, 256) and logits.shape == (3, 10)
    # load_state_dict copies into channels_last weights, so records load without losing the fast layout
    clone = build_model("resnet9_cpu", 10)
    clone.load_state_dict(model.state_dict())
    assert clone.prep[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(clone.eval()(x), logits)


def test_bf16_trunk_only_where_the_cpu_supports_it(monkeypatch):
    monkeypatch.setattr(resnet9_module, "cpu_bf16_supported", lambda: False)
    assert build_model("resnet9_cpu", 10).cpu_bf16 is False
    assert build_model("resnet9", 10).cpu_bf16 is False

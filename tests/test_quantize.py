"""int8 weight-only quantization: close to the float model, used by --dtype int8, never saved as HF."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from kogpt.api import KoGPT
from kogpt.checkpoint import CheckpointError, load_model, save_model
from kogpt.quantize import Int8Linear, quantize_int8


def test_int8_linear_equals_dequantized_weights():
    torch.manual_seed(0)
    lin = nn.Linear(48, 80)
    q = Int8Linear.from_linear(lin, compute_dtype=torch.float32)
    w = q.qweight.float() * q.scales[:, None]
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() <= 127
    assert (w - lin.weight).abs().max() <= q.scales.max() / 2 + 1e-6  # rounding error at most half a step
    x = torch.randn(5, 7, 48)
    torch.testing.assert_close(q(x), x @ w.T + lin.bias, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_quantized_model_tracks_the_float_model(hf_dir):
    ref = load_model(hf_dir)
    q = quantize_int8(load_model(hf_dir))
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == 4 * ref.config.n_layer + 1
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    a, b = ref(ids), q(ids).float()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree > 0.9
    assert ((a - b).norm() / a.norm()).item() < 0.05


def test_dtype_int8_through_the_api(model_dir, tmp_path):
    gpt = KoGPT.from_pretrained(model_dir, dtype="int8")
    assert isinstance(gpt.model.lm_head, Int8Linear) and gpt.model.wte.weight.dtype == torch.bfloat16
    ref = KoGPT.from_pretrained(model_dir, dtype="fp32")
    [q], [f] = (g.complete(["안녕하세요"], greedy=True, max_new_tokens=8) for g in (gpt, ref))
    assert q.token_ids[:2] == f.token_ids[:2]  # the first greedy steps agree with the float model
    with pytest.raises(CheckpointError, match="int8"):
        save_model(gpt.model, tmp_path)

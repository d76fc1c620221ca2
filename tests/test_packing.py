"""oneDNN-packed linears: same outputs as nn.Linear, used for bf16/fp16 on CPU, saved as plain weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from kogpt.api import KoGPT
from kogpt.core.layout import Layout
from kogpt.core.packed import PackedLinear, can_pack
from kogpt.hf.load import load

pytestmark = pytest.mark.skipif(not can_pack("cpu", torch.bfloat16), reason="PyTorch without oneDNN")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_linear_equals_linear(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 300).to(dtype)
    packed = PackedLinear(lin.weight, lin.bias)
    for shape in [(1, 64), (8, 64), (2, 17, 64)]:
        x = torch.randn(*shape, dtype=dtype)
        torch.testing.assert_close(packed(x).float(), lin(x).float(), atol=2e-2, rtol=1e-2)
    sd = packed.state_dict()
    assert set(sd) == {"weight", "bias"} and torch.equal(sd["weight"], lin.weight.detach())


def test_fp32_and_training_layouts_are_left_alone(hf_dir):
    for layout in ("fp32", Layout(torch.bfloat16), Layout.parse("bf16", plain=True)):
        model = load(hf_dir, layout)
        assert not any(isinstance(m, PackedLinear) for m in model.modules())
        assert isinstance(model.h[0].attn.qkv, nn.Linear)


def test_bf16_model_is_packed_generates_like_unpacked_and_saves(model_dir, tmp_path):
    gpt = KoGPT.from_pretrained(model_dir, dtype="bf16")
    assert isinstance(gpt.model.h[0].attn.qkv, PackedLinear) and isinstance(gpt.model.lm_head, PackedLinear)
    plain = load(model_dir, Layout(torch.bfloat16))
    ids = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = gpt.model(ids).float(), plain(ids).float()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95
    gpt.save_pretrained(tmp_path)  # packed weights save as the dense checkpoint
    again = load(tmp_path, Layout())
    assert again.wte.weight.dtype == torch.bfloat16
    assert torch.equal(again.h[0].attn.qkv.weight, plain.h[0].attn.qkv.weight)

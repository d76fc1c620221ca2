"""int4 weight-only quantization: the kernel equals its dequantized weights, --dtype int4 loads both families and
classifiers through the one load path, bad group sizes are one-line errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kogpt.api import KoGPT
from kogpt.core import int4
from kogpt.core.classifier import Classifier
from kogpt.core.int4 import Int4Linear, quantize_rows
from kogpt.core.layout import Layout
from kogpt.errors import UserError
from kogpt.hf.folder import CheckpointError
from kogpt.hf.load import load
from kogpt.hf.save import save_model

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_quantized(model: nn.Module, group: int = 32) -> nn.Module:
    """The oracle of a whole model: every nn.Linear of a plain model keeps the weights its int4 layer holds."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight = nn.Parameter(dequantize(m.weight, group).to(m.weight.dtype))  # a tied head: its own copy
    return model


def dequantize(w: torch.Tensor, group: int) -> torch.Tensor:
    """The oracle: the fp32 weights w ≈ (q - 8) · scale + zero of quantize_rows, unpacked by hand."""
    q, sz = quantize_rows(w, group, torch.bfloat16)
    scale, zero = sz.float().transpose(0, 1).unsqueeze(-1).unbind(-2)  # each (out, G, 1)
    return ((q.view(w.size(0), -1, group).float() - 8) * scale + zero).flatten(1)[:, :w.size(1)]


@pytest.mark.parametrize("out,n_in,group,kernel", [(96, 64, 32, "cpu"), (64, 256, 64, "cpu"), (16, 2304, 128, "cpu"),
                                                   (100, 64, 32, "torch"), (32, 70, 32, "torch"), (16, 32, 64, "torch")])
def test_int4_linear_equals_its_dequantized_weights(out, n_in, group, kernel):
    torch.manual_seed(0)
    lin = nn.Linear(n_in, out)
    layer = Int4Linear.from_float(lin.weight, lin.bias, torch.bfloat16, group)
    assert layer.kernel == kernel and layer.qweight.dtype == torch.uint8
    w = dequantize(lin.weight.detach(), group)
    q, sz = quantize_rows(lin.weight.detach(), group, torch.bfloat16)
    assert q.min() >= 0 and q.max() <= 15 and sz.shape == (-(-n_in // group), out, 2)
    step = sz[..., 0].float().t().repeat_interleave(group, 1)[:, :n_in]  # each weight's group scale
    assert ((w - lin.weight).abs() <= step / 2 + 1e-3 * step.max()).all()  # round to nearest: at most half a step
    torch.testing.assert_close(layer.dequantized().float(), w.bfloat16().float(), atol=0, rtol=0)  # one rounding to bf16
    for rows in (1, 7, 300):  # decode, a small batch, a prompt
        x = torch.randn(rows, n_in)
        ref = x.bfloat16().float() @ w.T + lin.bias.bfloat16().float()
        torch.testing.assert_close(layer(x), ref, atol=0.05, rtol=0.02)  # bf16 accumulation and output
    x = torch.randn(3, n_in, requires_grad=True)  # PPLM: gradients w.r.t. the input flow through
    (g,) = torch.autograd.grad(layer(x).sum(), x)
    torch.testing.assert_close(g, w.sum(0).expand(3, n_in), atol=0.05, rtol=0.02)


def test_quantizing_in_row_blocks_packs_the_same_weights(monkeypatch):
    w = torch.randn(160, 64)
    whole = Int4Linear.from_float(w, None)
    monkeypatch.setattr(int4, "ROWS", 64)  # the CPU packing's row blocks: 2 whole ones, then 32 rows
    blocks = Int4Linear.from_float(w, None)
    assert torch.equal(whole.qweight, blocks.qweight) and torch.equal(whole.scales_and_zeros, blocks.scales_and_zeros)


def reference_from_float(weight: torch.Tensor, dtype: torch.dtype, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle of the fast rounding: the (qweight, scales_and_zeros) of the first int4 code (issue 20), fp32
    temporaries of 1024 rows at a time, int32 codes packed by the CPU kernel's op block by block."""
    out, n_in = weight.shape
    G = -(-n_in // group)
    kernel = int4.kernel_for(weight.device, out, n_in, group)
    packs, szs = [], []
    for i in range(0, out, 1024):
        w = weight[i:i + 1024].float()
        wg = F.pad(w, (0, G * group - n_in)).view(w.size(0), G, group)
        lo, hi = torch.aminmax(wg, dim=-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_(min=1e-6).to(dtype)
        zero = (lo + 8 * scale.float()).to(dtype)
        q = ((wg - zero.float()) / scale.float() + 8).round_().clamp_(0, 15).to(torch.int32).view(w.size(0), -1)
        szs.append(torch.cat((scale, zero), -1).transpose(0, 1))
        packs.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1) if kernel == "cpu"
                     else (q[:, 0::2] | q[:, 1::2] << 4).to(torch.uint8))
    return torch.cat(packs), torch.cat(szs, 1)


@pytest.mark.parametrize("out,n_in,group,wdtype,dtype", [
    (1072, 256, 32, torch.bfloat16, torch.bfloat16),  # 8 blocks of 128 rows and a part block of 48 (3 x 16)
    (2128, 128, 64, torch.bfloat16, torch.bfloat16),  # past the old 1024-row blocks; a last packing block of 16
    (208, 384, 128, torch.float16, torch.bfloat16), (144, 96, 32, torch.float32, torch.bfloat16),
    (96, 64, 32, torch.bfloat16, torch.float16), (96, 64, 32, torch.float16, torch.float16),
    (100, 64, 32, torch.bfloat16, torch.bfloat16), (48, 70, 32, torch.bfloat16, torch.bfloat16),  # plain torch
    (16, 100, 64, torch.float16, torch.bfloat16)])  # in_features padded to whole groups
def test_fast_rounding_packs_the_bits_of_the_reference(out, n_in, group, wdtype, dtype):
    torch.manual_seed(0)
    w = torch.randn(out, n_in) * 0.02
    w[1] = 0.37  # a constant row: hi == lo in every group, scale clamped to 1e-6
    w[2, :group] = 0.0
    w[3, -group:] = -1.5  # a constant group at the end (padded with zeros when n_in needs it)
    w[4] *= 1e-6  # tiny ranges: the scale clamp
    w[5] = torch.randint(0, 31, (n_in,)) * 0.03125  # groups from 0 to 0.9375: scale 1/16, zero 1/2, and each
    w[5, 0::group], w[5, 1::group] = 0.0, 0.9375  # odd multiple of 1/32 a .5 tie (to even)
    w[6] *= 1e3
    w = w.to(wdtype)
    packed, sz = reference_from_float(w, dtype, group)
    before = w.clone()
    layer = Int4Linear.from_float(w, None, dtype, group)
    assert torch.equal(w, before)  # worked on in a copy, an fp32 weight too
    assert layer.kernel == int4.kernel_for("cpu", out, n_in, group)
    assert torch.equal(layer.qweight, packed) and torch.equal(layer.scales_and_zeros, sz)
    q, sz2 = quantize_rows(w, group, dtype)
    assert torch.equal(sz2, sz) and q.shape == (out, -(-n_in // group) * group)


@torch.no_grad()
def test_dtype_int4_loads_both_families_and_equals_its_dequantized_weights(hf_dir, family):
    ref, q = fake_quantized(load(hf_dir, Layout(torch.bfloat16))), load(hf_dir, "int4")  # int4 rounds bf16 weights
    layers = [m for m in q.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 4 * q.config.n_layer + 1 and q.lm_head in layers  # the LM head too
    assert q.wte.weight.dtype == torch.bfloat16 and {m.group for m in layers} == {32}
    assert {m.kernel for m in layers} == {"cpu", "torch"}  # vocab 1000 is not a multiple of 16: plain torch
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    a, b = ref(ids).float(), q(ids).float()
    assert ((a - b).norm() / a.norm()).item() < 0.03  # the kernels' bf16 sums (int4 rounding alone: ~20%)


def test_quantizing_while_reading_equals_quantizing_the_loaded_model(hf_dir):
    streamed = load(hf_dir, "int4-g64")
    whole = load(hf_dir, Layout(torch.bfloat16))
    for parent in list(whole.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int4Linear.from_float(child.weight, child.bias, torch.bfloat16, 64))
    a, b = streamed.state_dict(), whole.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_greedy_generation_in_int4_through_the_api(model_dir, tmp_path, family):
    gpt = KoGPT.from_pretrained(model_dir, dtype="int4")
    assert isinstance(gpt.model.lm_head, Int4Linear)
    [c] = gpt.complete(["안녕하세요"], greedy=True, max_new_tokens=8, repetition_penalty=1.0)
    [again] = gpt.complete(["안녕하세요"], greedy=True, max_new_tokens=8, repetition_penalty=1.0)
    assert len(c.token_ids) == 8 and c.token_ids == again.token_ids
    with pytest.raises(CheckpointError, match="int4"):
        save_model(gpt.model, tmp_path)


@torch.no_grad()
def test_a_classifier_loads_in_int4(hf_dir, tmp_path):
    import transformers

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=3).eval()
    hf.score.weight.normal_(0.0, 0.5)
    hf.save_pretrained(tmp_path / "cls")
    model = load(tmp_path / "cls", "int4")
    assert isinstance(model, Classifier) and isinstance(model.score, Int4Linear) and model.score.kernel == "torch"
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 4 * model.config.n_layer + 1  # no LM head
    ids = torch.randint(0, 1000, (16, 16), generator=torch.Generator().manual_seed(5))
    ref = fake_quantized(load(tmp_path / "cls", Layout(torch.bfloat16)))(ids).float()
    assert ((model(ids).float() - ref).norm() / ref.norm()).item() < 0.03


def test_dtype_names_and_bad_group_sizes():
    assert Layout.parse("int4") == Layout(torch.bfloat16, "int4", group=32)
    assert Layout.parse("int4-g128") == Layout(torch.bfloat16, "int4", group=128)
    for name, message in [("int4-g48", "int4 group size must be one of 32, 64, 128, got 48"),
                          ("int4-64", "unknown dtype 'int4-64'"), ("int4-gx", "unknown dtype 'int4-gx'")]:
        with pytest.raises(UserError, match=message) as e:
            Layout.parse(name)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="got 16"):
        Int4Linear.from_float(torch.randn(16, 64), None, group=16)
    with pytest.raises(UserError, match="--compile works with fp32, bf16 and fp16 weights, not int4"):
        Layout.parse("int4", plain=True)


def test_a_bad_group_on_the_command_line_is_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "kogpt", "generate", "--dtype", "int4-g48", "--prompt", "x"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "int4-g48" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("family", ["gpt2"])
def test_the_quantization_benchmark_has_int4_rows(model_dir, tmp_path):
    from test_quantize import quantization_bench_rows

    rows = quantization_bench_rows(model_dir, tmp_path, "int4,int4-g64", prompts=2, new_tokens=4)
    assert set(rows) == {"fp32", "int4", "int4-g64"}
    assert all(rows[d]["bits_per_byte"] > 0 and 0 <= rows[d]["greedy_prefix"] <= 1 for d in ("int4", "int4-g64"))

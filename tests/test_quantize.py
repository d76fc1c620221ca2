"""int8 weight-only quantization: close to the float model, used by --dtype int8, never saved as HF."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from kogpt.api import KoGPT
from kogpt.core.int8 import Int8Linear, fbgemm_available
from kogpt.core.layout import Layout
from kogpt.hf.folder import CheckpointError
from kogpt.hf.load import load
from kogpt.hf.save import save_model

KERNELS = ["int8pack", pytest.param("fbgemm", marks=pytest.mark.skipif(not fbgemm_available(), reason="no fbgemm"))]
LAYOUT = {"int8pack": "int8", "fbgemm": "int8-dynamic"}


def int8_linear(lin: nn.Linear, compute_dtype: torch.dtype, kernel: str) -> Int8Linear:
    return Int8Linear.from_float(lin.weight, lin.bias, compute_dtype, kernel)


def quantize_afterwards(model: nn.Module, kernel: str) -> nn.Module:
    """The oracle: every nn.Linear of a loaded model swapped for an Int8Linear of its weights."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, int8_linear(child, child.weight.dtype, kernel))
    return model


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_linear_equals_dequantized_weights(kernel):
    torch.manual_seed(0)
    lin = nn.Linear(48, 80)
    q = int8_linear(lin, torch.float32, kernel)
    w = q.qweight.float() * q.scales[:, None]  # fbgemm: unpacked from its own layout
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() <= 127
    assert (w - lin.weight).abs().max() <= q.scales.max() / 2 + 1e-6  # rounding error at most half a step
    assert torch.equal(q.qweight, int8_linear(lin, torch.float32, "int8pack").qweight)
    for rows in (1, 5 * 7, 300):  # decode, a small batch, a prompt
        x = torch.randn(rows, 48)
        y, ref = q(x), x @ w.T + lin.bias
        if kernel == "int8pack":  # the weights are exactly the dequantized ones
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        else:  # fbgemm also quantizes each input row to int8: ~1% relative error
            assert ((y - ref).norm() / ref.norm()).item() < 0.03
    x = torch.randn(3, 48, requires_grad=True)  # PPLM: gradients w.r.t. the input flow through
    (g,) = torch.autograd.grad(q(x).sum(), x)
    torch.testing.assert_close(g, w.sum(0).expand(3, 48), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@torch.no_grad()
def test_quantized_model_tracks_the_float_model(hf_dir, kernel):
    ref = load(hf_dir)
    q = load(hf_dir, LAYOUT[kernel])
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == 4 * ref.config.n_layer + 1
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    a, b = ref(ids), q(ids).float()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree > 0.9
    assert ((a - b).norm() / a.norm()).item() < 0.05


@pytest.mark.parametrize("dtype,kernel", [("int8", "int8pack"), pytest.param(
    "int8-dynamic", "fbgemm", marks=pytest.mark.skipif(not fbgemm_available(), reason="no fbgemm"))])
def test_dtype_int8_through_the_api(model_dir, tmp_path, dtype, kernel):
    gpt = KoGPT.from_pretrained(model_dir, dtype=dtype)
    assert isinstance(gpt.model.lm_head, Int8Linear) and gpt.model.wte.weight.dtype == torch.bfloat16
    assert {m.kernel for m in gpt.model.modules() if isinstance(m, Int8Linear)} == {kernel}
    ref = KoGPT.from_pretrained(model_dir, dtype="fp32")
    [q], [f] = (g.complete(["안녕하세요"], greedy=True, max_new_tokens=8) for g in (gpt, ref))
    assert q.token_ids[:2] == f.token_ids[:2]  # the first greedy steps agree with the float model
    with pytest.raises(CheckpointError, match="int8"):
        save_model(gpt.model, tmp_path)


@pytest.mark.parametrize("kernel", KERNELS)
@torch.no_grad()
def test_quantizing_while_reading_equals_quantizing_the_loaded_model(hf_dir, kernel):
    """load never builds the float model, yet gives exactly the model quantizing the loaded bf16 one makes."""
    streamed = load(hf_dir, LAYOUT[kernel])
    whole = quantize_afterwards(load(hf_dir, Layout(torch.bfloat16)), kernel)
    assert {n for n, m in streamed.named_modules() if isinstance(m, Int8Linear)} == \
        {n for n, m in whole.named_modules() if isinstance(m, Int8Linear)}
    for (n, a), (m, b) in zip(sorted(streamed.state_dict().items()), sorted(whole.state_dict().items())):
        assert n == m and a.dtype == b.dtype and torch.equal(a, b), n
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(streamed(ids), whole(ids))


def quantization_bench():
    """benchmarks/quantization.py as a module."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("quant_bench", ROOT / "benchmarks" / "quantization.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def quantization_bench_rows(model_dir, tmp_path, dtypes: str, prompts: int, new_tokens: int) -> dict:
    """The rows of benchmarks/quantization.py run on model_dir over a few Korean lines."""
    import json

    from conftest import KOREAN_LINES

    bench = quantization_bench()
    data, out = tmp_path / "heldout.txt", tmp_path / "q.json"
    data.write_text("\n\n".join(KOREAN_LINES), encoding="utf-8")
    assert bench.main(["--model", str(model_dir), "--data", str(data), "--dtypes", dtypes, "--prompts", str(prompts),
                       "--new-tokens", str(new_tokens), "--json", str(out)]) == 0
    return json.loads(out.read_text())["rows"]


@pytest.mark.parametrize("family", ["gpt2"])
def test_quantization_benchmark_reports_each_dtype_against_fp32(model_dir, tmp_path, capsys):
    rows = quantization_bench_rows(model_dir, tmp_path, "int8", prompts=4, new_tokens=6)
    assert rows["fp32"]["bpb_change"] == 0 and rows["fp32"]["greedy_identical"] == 1.0
    assert rows["int8"]["bits_per_byte"] > 0 and 0 <= rows["int8"]["greedy_prefix"] <= 1
    assert abs(rows["int8"]["bpb_change"]) < 0.05  # random weights: int8 moves bits per byte a little
    assert "| int8 |" in capsys.readouterr().out
    assert quantization_bench().agreement([[1, 2, 3], [4, 5]], [[1, 2, 9], [4, 5]]) == (0.5, (2 / 3 + 1) / 2)

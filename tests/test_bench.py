"""`kogpt bench` runs end to end on a tiny shape and reports both engines (numbers are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_reports_kogpt_and_transformers(tmp_path):
    out = tmp_path / "bench.json"
    model = tmp_path / "model"
    from kogpt.apps.bench import make_random_checkpoint

    make_random_checkpoint(model, "tiny-gpt2")
    r = subprocess.run([sys.executable, "-m", "kogpt", "bench", "--model", str(model), "--dtype", "fp32",
                        "--dtype", "int8", "--repeats", "1", "--compile", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(row["dtype"], row.get("compiled", False)) for row in rows] == [("fp32", False), ("fp32", True),
                                                                            ("int8", False)]
    for row in rows:
        for k in ("b1", "b8", "ttft", "load_s")[:3 if row.get("compiled") else 4]:  # compiled: no load of its own
            assert row[f"kogpt_{k}"] > 0 and row[f"hf_{k}"] > 0 and row[f"ratio_{k}"] > 0
    assert "kogpt_load_s" not in rows[1] and "kogpt_peak_rss_mb" not in rows[1]
    assert rows[0]["kogpt_linears_b1"] > 0 and rows[2]["kogpt_linears_b1"] > 0 and "kogpt_linears_b1" not in rows[1]
    split = r.stdout.split("| rest ms |")[1].splitlines()  # the step split: the eager rows only
    assert [line.split("|")[1].strip() for line in split[2:4]] == ["fp32", "int8"]
    assert rows[2]["peer_dtype"] == "fp32" and rows[1]["hf_b1"] == rows[0]["hf_b1"]  # one peer measurement
    assert rows[0]["bandwidth_gbs"] > 0 and rows[0]["roofline_b1"] * 4 == pytest.approx(rows[2]["roofline_b1"])
    assert "| fp32 |" in r.stdout and "| fp32 compiled |" in r.stdout and "| int8 vs hf fp32 |" in r.stdout and "GB/s measured read bandwidth" in r.stdout


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-gptj"])
def test_decode_bytes_counts_every_linear_weight_once(tmp_path, preset):
    import torch

    from kogpt.apps.bench import decode_bytes, make_random_checkpoint
    from kogpt.hf.load import load

    model = load(make_random_checkpoint(tmp_path / preset, preset))
    weights = {m.weight.data_ptr(): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert decode_bytes(tmp_path / preset, "fp32") == 4 * sum(w.numel() for w in weights.values())
    assert decode_bytes(tmp_path / preset, "int8") == sum(w.numel() for w in weights.values())
    n = sum(w.numel() for w in weights.values())  # int4: half a byte a weight and a bf16 scale and zero a group
    assert decode_bytes(tmp_path / preset, "int4") == int(n * (0.5 + 4 / 32))
    assert decode_bytes(tmp_path / preset, "int4-g128") == int(n * (0.5 + 4 / 128))


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-gptj"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8", "int8-dynamic", "int4"])
def test_the_step_split_times_every_linear_layer_of_every_layout(tmp_path, preset, dtype, monkeypatch):
    from kogpt.hf.load import load
    from kogpt.apps.bench import linear_layers, make_random_checkpoint, time_linears

    model = load(make_random_checkpoint(tmp_path / preset, preset), dtype)
    layers = linear_layers(model)
    assert len(layers) == 4 * model.config.n_layer + 1  # qkv, proj, fc, mlp proj per block; the head
    assert layers[-1] is model.lm_head and layers[0] is model.h[0].attn.qkv
    calls = []
    for m in layers:  # each layer runs once per step, on a batch of one new token per row
        monkeypatch.setattr(m, "forward", lambda x, m=m, f=m.forward: calls.append((m, tuple(x.shape))) or f(x))
    assert time_linears(model, batch=3, steps=2) > 0
    assert calls == [(m, (3, 1, m.in_features)) for m in layers] * 3  # warm-up + 2 steps


def test_bench_rejects_a_folder_without_config(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kogpt", "bench", "--model", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no config.json" in r.stderr


def test_int4_rows_are_compared_with_fp32_and_llama_cpp_q4_0(tmp_path):
    from kogpt.apps.bench import format_table, gguf_dtype, param_bytes

    assert [gguf_dtype(d) for d in ("fp32", "bf16", "int8", "int4", "int4-g64")] == ["f32", "bf16", "q8_0", "q4_0", "q4_0"]
    assert param_bytes("int4") == 0.625 and param_bytes("int4-g64") == 0.5625
    row = {"dtype": "int4", "peer_dtype": "fp32", "kogpt_b1": 100.0, "hf_b1": 40.0, "ratio_b1": 2.5,
           "bandwidth_gbs": 30.0, "roofline_b1": 200.0, "llama_format": "q4_0", "llama_b1": 125.0,
           "ratio_llama_b1": 0.8, "llama_ttft": 0.5, "kogpt_ttft": 0.25, "ratio_llama_ttft": 0.5}
    line = format_table([row]).splitlines()[2]
    # transformers fp32 reads 6.4x int4's bytes, so its 40 tok/s is 40 / (200 / 6.4) = 128% of its own roofline
    assert line.startswith("| int4 vs hf fp32 | 100.0 / 40.0 (2.50×) | 200: 50%, 128% |") and "Q4_0: 125.0 (0.80×)" in line

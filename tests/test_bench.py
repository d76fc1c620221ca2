"""`kogpt bench` runs end to end on a tiny shape and reports both engines (numbers are not asserted)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
    from kogpt.apps.bench import format_table, param_bytes
    from kogpt.apps.llamacpp import gguf_dtype

    assert [gguf_dtype(d) for d in ("fp32", "bf16", "int8", "int4", "int4-g64")] == ["f32", "bf16", "q8_0", "q4_0", "q4_0"]
    assert param_bytes("int4") == 0.625 and param_bytes("int4-g64") == 0.5625
    row = {"dtype": "int4", "peer_dtype": "fp32", "kogpt_b1": 100.0, "hf_b1": 40.0, "ratio_b1": 2.5,
           "bandwidth_gbs": 30.0, "roofline_b1": 200.0, "llama_format": "q4_0", "llama_b1": 125.0,
           "ratio_llama_b1": 0.8, "llama_ttft": 0.5, "kogpt_ttft": 0.25, "ratio_llama_ttft": 0.5}
    line = format_table([row]).splitlines()[2]
    # transformers fp32 reads 6.4x int4's bytes, so its 40 tok/s is 40 / (200 / 6.4) = 128% of its own roofline
    assert line.startswith("| int4 vs hf fp32 | 100.0 / 40.0 (2.50×) | 200: 50%, 128% |") and "Q4_0: 125.0 (0.80×)" in line


# llama-batched-bench's stdout, captured on the machine of docs/performance.md (llama.cpp 0c1e570, random
# KoGPT2-base weights as Q8_0): -c 1272 -npp 32,32,32,32 -ntg 127 -npl 8 -t 2 --no-repack --output-format jsonl
BATCHED_SAMPLE = (
    '{"n_kv_max": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 32, "tg": 127, "pl": 8, "n_kv": 1272, "t_pp": 0.307248, "speed_pp": 833.203125, "t_tg": 3.963420, "speed_tg": 256.344269, "t": 4.270668, "speed": 297.845673}\n'
    '{"n_kv_max": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 32, "tg": 127, "pl": 8, "n_kv": 1272, "t_pp": 0.308330, "speed_pp": 830.279236, "t_tg": 3.803685, "speed_tg": 267.109406, "t": 4.112015, "speed": 309.337402}\n'
    '{"n_kv_max": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 32, "tg": 127, "pl": 8, "n_kv": 1272, "t_pp": 0.309586, "speed_pp": 826.910828, "t_tg": 3.959286, "speed_tg": 256.611938, "t": 4.268872, "speed": 297.971008}\n'
    '{"n_kv_max": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 32, "tg": 127, "pl": 8, "n_kv": 1272, "t_pp": 0.308096, "speed_pp": 830.909851, "t_tg": 3.829321, "speed_tg": 265.321198, "t": 4.137417, "speed": 307.438202}\n'
    "\n"
)

FAKE_BATCHED = '''#!{python}
# a stand-in llama-batched-bench: logs its arguments, replays the recorded output (or fails on request)
import json, os, signal, sys
a = sys.argv[1:]
log = os.environ["FAKE_LOG"]
tries = sum(1 for _ in open(log)) if os.path.exists(log) else 0
with open(log, "a") as f:
    f.write(json.dumps(a) + "\\n")
mode = os.environ.get("FAKE_MODE", "")
if mode == "fail":
    sys.exit("error: failed to load model")
if mode == "crash" and "--no-repack" not in a:  # as ggml's repacked AMX Q8_0 kernels on some machines
    os.kill(os.getpid(), signal.SIGSEGV)
lines = {sample!r}.splitlines(keepends=True)
if mode == "drop" or (mode == "drop-once" and tries == 0):  # llama.cpp's logger lost the last line at exit
    lines = lines[:3]
sys.stdout.write("".join(lines))
'''


@pytest.fixture
def fake_batched(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "bin" / "llama-batched-bench"
    path.parent.mkdir()
    path.write_text(FAKE_BATCHED.format(python=sys.executable, sample=BATCHED_SAMPLE))
    path.chmod(0o755)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.jsonl"))
    return path


def _calls(tmp_path) -> list[list[str]]:
    return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def test_a_recorded_llama_batched_bench_run_parses():
    from kogpt.apps.llamacpp import parse_batched_bench

    runs = parse_batched_bench("llama_batched_bench: a line that is not a result\n" + BATCHED_SAMPLE)
    assert [(r["pp"], r["tg"], r["pl"], r["n_kv"]) for r in runs] == [(32, 127, 8, 1272)] * 4
    assert [r["t"] for r in runs] == [4.270668, 4.112015, 4.268872, 4.137417]
    assert runs[1]["speed_tg"] == pytest.approx(8 * 127 / runs[1]["t_tg"], rel=1e-5)  # S_TG: decode steps only


def _base_shape(tmp_path) -> Path:
    # kogpt bench's b8 workload is read off the config: a 1024-token context leaves 32 + 128 as they are
    (tmp_path / "config.json").write_text(json.dumps({"n_positions": 1024}))
    return tmp_path


def test_llama_b8_runs_kogpts_b8_workload_and_drops_the_warm_up(tmp_path, fake_batched):
    import torch

    from kogpt.apps.llamacpp import batched_bench

    out = batched_bench(str(fake_batched), fake_batched, _base_shape(tmp_path), repeats=3, timeout=60)
    # one warm-up run, then the median of 3: 8 sequences × 128 new tokens over prompt + 127 decode steps
    assert out == {"llama_b8": pytest.approx(8 * 128 / 4.137417), "llama_b8_tg": pytest.approx(265.321198)}
    [call] = _calls(tmp_path)
    arg = lambda k: call[call.index(k) + 1]  # noqa: E731
    assert (arg("-npp"), arg("-ntg"), arg("-npl"), arg("-c")) == ("32,32,32,32", "127", "8", str(8 * (32 + 128)))
    assert arg("-t") == str(torch.get_num_threads()) and arg("--output-format") == "jsonl"


def test_llama_b8_reruns_when_llama_cpp_drops_its_last_lines(tmp_path, fake_batched, monkeypatch):
    from kogpt.apps.llamacpp import TRIES, batched_bench

    monkeypatch.setenv("FAKE_MODE", "drop-once")
    assert batched_bench(str(fake_batched), fake_batched, _base_shape(tmp_path), 3, 60)["llama_b8"] > 0
    assert len(_calls(tmp_path)) == 2
    monkeypatch.setenv("FAKE_MODE", "drop")
    out = batched_bench(str(fake_batched), fake_batched, tmp_path, 3, 60)
    assert out == {"llama_b8_error": f"llama-batched-bench printed 3 of 4 result lines in {TRIES} runs"}


def test_a_crashing_llama_batched_bench_is_rerun_without_repacking(tmp_path, fake_batched, monkeypatch):
    from kogpt.apps.llamacpp import batched_bench

    monkeypatch.setenv("FAKE_MODE", "crash")
    out = batched_bench(str(fake_batched), fake_batched, _base_shape(tmp_path), 3, 60)
    assert out["llama_b8"] > 0 and out["llama_b8_note"] == ("killed by signal 11 with default buffers; "
                                                             "rerun with --no-repack")
    assert ["--no-repack" in call for call in _calls(tmp_path)] == [False, True]


@pytest.mark.slow
def test_bench_adds_a_llama_cpp_b8_column_or_says_why_not(tmp_path, fake_batched):
    from kogpt.apps.bench import make_random_checkpoint

    model = make_random_checkpoint(tmp_path / "model", "tiny-gpt2")
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no llama-bench of the machine's
    batched = ["--llama-batched-bench", str(fake_batched)]

    def bench(*args: str, repeats: int = 1) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kogpt", "bench", "--model", str(model), "--repeats", str(repeats),
                               "--no-peer", "--dtype", "bf16", *args], capture_output=True, text=True, timeout=600, env=env)

    r = bench("--dtype", "int4", *batched, "--json", str(tmp_path / "b.json"), repeats=3)
    assert r.returncode == 0, r.stderr  # 3 repeats: the recorded run's warm-up and 3 results
    assert "| llama.cpp b1 tok/s (kogpt ×) | llama.cpp b8 tok/s (kogpt ×) | llama.cpp TTFT 512 s (kogpt ×) |" in r.stdout
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["llama_batched_bench"] == {"path": str(fake_batched)}
    for row in result["rows"]:
        assert row["llama_b8"] == pytest.approx(8 * 96 / 4.137417)  # tiny context: 96 new tokens
        assert row["ratio_llama_b8"] == pytest.approx(row["kogpt_b8"] / row["llama_b8"])
        assert f"| {row['llama_format'].upper()}: {row['llama_b8']:.1f} ({row['ratio_llama_b8']:.2f}×) |" in r.stdout
    assert [call[call.index("-ntg") + 1] for call in _calls(tmp_path)] == ["95", "95"]  # BF16 and Q4_0
    assert "llama.cpp b8: llama-batched-bench, 8 sequences of 32-token prompts" in r.stdout

    # a failure is the cell's note: the last line of its stderr
    env["FAKE_MODE"] = "fail"
    r = bench(*batched)
    assert r.returncode == 0, r.stderr
    assert "| failed (llama-batched-bench exited 1: error: failed to load model) |" in r.stdout

    lone = tmp_path / "lone" / "llama-bench"  # a llama-bench with no llama-batched-bench beside it
    lone.parent.mkdir()
    lone.write_text("#!/bin/sh\nexit 1\n")
    lone.chmod(0o755)
    r = bench("--llama-bench", str(lone))
    assert r.returncode == 0, r.stderr
    assert f"no llama-batched-bench beside {lone}: no llama.cpp b8 column" in r.stdout
    assert "llama.cpp b8 tok/s" not in r.stdout


def test_a_missing_llama_batched_bench_is_a_user_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kogpt", "bench", "--model", str(tmp_path), "--llama-batched-bench",
                        str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--llama-batched-bench" in r.stderr and "not an executable file" in r.stderr


LLAMA_BATCHED = next((p for p in (os.environ.get("LLAMA_BATCHED_BENCH"), shutil.which("llama-batched-bench"),
                                  os.environ.get("LLAMA_BENCH") and str(Path(os.environ["LLAMA_BENCH"]).parent
                                                                        / "llama-batched-bench"))
                      if p and os.access(p, os.X_OK)), None)


@pytest.mark.skipif(LLAMA_BATCHED is None, reason="llama-batched-bench not built (set LLAMA_BATCHED_BENCH) or on PATH")
def test_real_llama_batched_bench_runs_the_b8_workload(tmp_path):
    pytest.importorskip("gguf")
    from kogpt.apps.bench import make_random_checkpoint
    from kogpt.apps.llamacpp import measure_llama

    out = measure_llama(None, make_random_checkpoint(tmp_path / "tiny", "tiny-gpt2"), "int8", repeats=1,
                        timeout=300, batched=LLAMA_BATCHED)
    assert "llama_b8_error" not in out, out
    assert out["llama_format"] == "q8_0" and out["llama_b8"] > 0 and out["llama_b8_tg"] > 0

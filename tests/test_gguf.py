"""GGUF export read back with gguf's own reader, `kogpt bench` with a fake llama-bench, and (when
llama.cpp is built: $LLAMA_BENCH, PATH, or ../llama.cpp-src/build/bin) the real llama-bench loading the
exported files and llama-simple's greedy text equal to kogpt's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import KOREAN_LINES, ROOT, make_hf_model

gguf = pytest.importorskip("gguf")

from kogpt.core.layout import Layout
from kogpt.hf.load import load
from kogpt.errors import UserError
from kogpt.hf.gguf import gguf_name, write_gguf

LLAMA_BENCH = next((p for p in (os.environ.get("LLAMA_BENCH"), shutil.which("llama-bench"),
                                 str(ROOT.parent / "llama.cpp-src" / "build" / "bin" / "llama-bench"))
                    if p and os.access(p, os.X_OK)), None)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 with non-trivial LayerNorms and biases (a swapped tensor would show)."""
    d = tmp_path_factory.mktemp("gpt2") / "tiny"
    make_hf_model("gpt2").save_pretrained(d)
    return d


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def q4_0_reference(w: np.ndarray) -> np.ndarray:
    """llama.cpp's quantize_row_q4_0_ref then dequantize_row_q4_0, per block of 32: d = (the signed value of
    largest magnitude) / -8, q = min(15, trunc(x / d + 8.5)), and back (q - 8) · fp16(d)."""
    blocks = w.reshape(-1, 32).astype(np.float32)
    big = np.take_along_axis(blocks, np.abs(blocks).argmax(1)[:, None], 1)
    d = big / -8
    inv = np.divide(1, d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(15, np.trunc(blocks * inv + np.float32(8.5)))
    return ((q - 8) * d.astype(np.float16).astype(np.float32)).reshape(w.shape)


def decode_q4_0_bytes(raw: np.ndarray) -> np.ndarray:
    """Q4_0 blocks decoded by hand from llama.cpp's layout (block_q4_0: fp16 d, then 16 bytes holding
    element j in the low nibble and element j + 16 in the high nibble of byte j), not with gguf's code."""
    blocks = raw.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n, 1)
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)  # elements 0..15, then 16..31
    return (q - 8) * d


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_gguf_tensors_and_metadata_match_the_model(gpt2_dir, tmp_path, dtype):
    model = load(gpt2_dir, Layout(torch.float32))
    cfg = model.config
    reader = gguf.GGUFReader(write_gguf(gpt2_dir, tmp_path / "m.gguf", dtype))
    meta = fields(reader)
    assert meta["general.architecture"] == "gpt2" and meta["general.type"] == "model"
    assert meta["general.file_type"] == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[dtype]
    assert meta["general.quantization_version"] == 2
    assert (meta["gpt2.block_count"], meta["gpt2.context_length"], meta["gpt2.embedding_length"],
            meta["gpt2.feed_forward_length"], meta["gpt2.attention.head_count"]) == (2, 128, 32, 128, 4)
    assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(cfg.layer_norm_epsilon)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"

    expected = {gguf_name(k): v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied head
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == expected.keys()
    assert {"token_embd.weight", "position_embd.weight", "output_norm.bias", "blk.1.attn_qkv.weight",
            "blk.1.attn_output.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.bias", "blk.0.ffn_norm.weight"} <= set(tensors)
    wide = dtype.upper()
    for name, t in tensors.items():
        want = expected[name].numpy()
        stays_f32 = want.ndim == 1 or name.startswith("position_embd")
        assert t.tensor_type.name == ("F32" if stays_f32 else wide), name
        assert list(t.shape) == list(reversed(want.shape)), name  # ggml order: (in, out)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if t.tensor_type.name == "F32":
            np.testing.assert_array_equal(got, want, err_msg=name)
        elif t.tensor_type.name in ("F16", "BF16"):  # round to nearest even, as torch
            torch_dtype = torch.float16 if t.tensor_type.name == "F16" else torch.bfloat16
            np.testing.assert_array_equal(got, expected[name].to(torch_dtype).float().numpy(), err_msg=name)
        elif t.tensor_type.name == "Q4_0":  # requantized from the float weights, as llama.cpp's own quantizer
            assert t.data.nbytes == want.size // 32 * 18, name  # 18 bytes a block of 32
            np.testing.assert_array_equal(got, q4_0_reference(want), err_msg=name)
            np.testing.assert_array_equal(decode_q4_0_bytes(np.asarray(t.data)).reshape(want.shape), got, err_msg=name)
            step = np.abs(want.reshape(-1, 32)).max(1, keepdims=True) / 8  # |d|
            err = np.abs(got - want).reshape(-1, 32)  # half a step, but a whole one where [-8d, 7d] clips
            assert (err <= step * 1.01 + 1e-12).all() and np.median(err / step) < 0.3, name
        else:  # Q8_0: blocks of 32 share an fp16 scale amax/127; rounding error <= scale/2 (+ the scale's rounding)
            blocks_want, blocks_got = want.reshape(-1, 32), got.reshape(-1, 32)
            bound = np.abs(blocks_want).max(axis=1, keepdims=True) / 127 * 0.6
            assert (np.abs(blocks_got - blocks_want) <= bound + 1e-12).all(), name
    qkv = expected["blk.0.attn_qkv.weight"]
    assert qkv.shape == (3 * cfg.n_embd, cfg.n_embd)  # kogpt's fused (q, k, v) rows, as the converter's transposed c_attn


def test_placeholder_vocabulary_has_vocab_size_unique_tokens(gpt2_dir, tmp_path):
    meta = fields(gguf.GGUFReader(write_gguf(gpt2_dir, tmp_path / "m.gguf")))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 1000 == len(set(tokens))
    assert tokens[ord("A")] == "A" and tokens[ord(" ")] == "\u0120" and tokens[ord("\n")] == "\u010a"  # GPT-2 bytes
    assert meta["tokenizer.ggml.merges"] == ["\u0120 \u0120"] and tokens[256] == "\u0120\u0120"
    assert set(types[:257]) == {int(gguf.TokenType.NORMAL)} and set(types[257:]) == {int(gguf.TokenType.CONTROL)}
    assert meta["tokenizer.ggml.eos_token_id"] == 1  # from config.json


@pytest.mark.parametrize("files", ["tokenizer.json", "vocab.json"])
def test_byte_level_tokenizer_is_exported_by_id(gpt2_dir, tmp_path, files):
    from tokenizers import ByteLevelBPETokenizer

    from kogpt.text.tokenizer import Tokenizer

    folder = tmp_path / "model"
    shutil.copytree(gpt2_dir, folder)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(KOREAN_LINES * 3, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    if files == "tokenizer.json":
        bpe.save(str(folder / "tokenizer.json"))
    else:
        bpe.save_model(str(folder))
    tok = Tokenizer.from_dir(folder)
    meta = fields(gguf.GGUFReader(write_gguf(folder, tmp_path / "m.gguf", "q8_0")))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    n = tok.vocab_size
    assert len(tokens) == len(types) == 1000
    assert tokens[:n] == [tok.id_to_token(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, 1000)] and set(types[n:]) == {int(gguf.TokenType.UNUSED)}
    eot = tok.token_to_id("<|endoftext|>")
    assert types[eot] == int(gguf.TokenType.CONTROL) and types[eot + 1] == int(gguf.TokenType.NORMAL)
    merges = json.loads(tok.tokenizer.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]


def test_a_non_byte_level_tokenizer_is_refused_unless_a_placeholder_is_asked_for(gpt2_dir, tmp_path, korean_tokenizer):
    folder = tmp_path / "model"
    shutil.copytree(gpt2_dir, folder)
    korean_tokenizer.save(folder)  # SentencePiece-style (Metaspace, byte fallback)
    with pytest.raises(UserError, match="byte-level BPE"):
        write_gguf(folder, tmp_path / "m.gguf")
    meta = fields(gguf.GGUFReader(write_gguf(folder, tmp_path / "m.gguf", tokenizer=False)))
    assert len(meta["tokenizer.ggml.tokens"]) == 1000


def test_gptj_is_refused(tmp_path):
    make_hf_model("gptj").save_pretrained(tmp_path / "gptj")
    with pytest.raises(UserError, match="GGUF export supports the GPT-2 family"):
        write_gguf(tmp_path / "gptj", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_kogpt_imports_without_gguf():
    code = "import sys, kogpt, kogpt.hf.gguf, kogpt.apps.bench, kogpt.cli.bench; assert 'gguf' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


FAKE = '''#!{python}
# a stand-in llama-bench: checks its arguments, prints llama-bench-shaped JSON (or fails on request)
import json, os, sys
a = sys.argv[1:]
arg = lambda k: a[a.index(k) + 1]
with open(arg("-m"), "rb") as f:
    assert f.read(4) == b"GGUF"
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(a) + "\\n")
if os.environ.get("FAKE_MODE") == "fail":
    sys.exit("error: failed to load model")
if os.environ.get("FAKE_MODE") == "garbage":
    print("not json"); sys.exit(0)
if os.environ.get("FAKE_MODE") == "crash" and "--repack" not in a:  # as ggml's AMX Q8_0 matmul on some machines
    import signal; os.kill(os.getpid(), signal.SIGSEGV)
base = dict(build_commit="fake123", build_number=4242, n_depth=0, avg_ns=1, stddev_ns=0, stddev_ts=0.0)
p, n = int(arg("-p")), int(arg("-n"))
print(json.dumps([dict(base, n_prompt=p, n_gen=0, avg_ts=1000.0), dict(base, n_prompt=0, n_gen=n, avg_ts=250.0)], indent=2))
'''


@pytest.fixture
def fake_llama(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "llama-bench"
    path.write_text(FAKE.format(python=sys.executable))
    path.chmod(0o755)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.jsonl"))
    return path


def test_bench_adds_llama_cpp_columns(tmp_path, fake_llama):
    from kogpt.apps.bench import make_random_checkpoint

    model = make_random_checkpoint(tmp_path / "model", "tiny-gpt2")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "kogpt", "bench", "--model", str(model), "--dtype", "fp32",
                        "--dtype", "int8", "--dtype", "int8-dynamic", "--dtype", "int4", "--repeats", "1", "--no-peer",
                        "--llama-bench", str(fake_llama), "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "| llama.cpp b1 tok/s (kogpt ×) | llama.cpp TTFT 512 s (kogpt ×) |" in r.stdout
    assert "| fp32 |" in r.stdout and " F32: 250.0 (" in r.stdout and " Q8_0: 250.0 (" in r.stdout
    assert "| int4 |" in r.stdout and " Q4_0: 250.0 (" in r.stdout
    assert "llama-bench build 4242 (fake123)" in r.stdout
    result = json.loads(out.read_text())
    assert result["llama_bench"] == {"path": str(fake_llama), "build_number": 4242, "build_commit": "fake123"}
    rows = result["rows"]
    assert [row["llama_format"] for row in rows] == ["f32", "q8_0", "q8_0", "q4_0"]
    for row in rows:
        assert row["llama_b1"] == 250.0 and row["llama_ttft"] == pytest.approx(127 / 1000)  # tiny context: 127-token prompt
        assert row["ratio_llama_b1"] == pytest.approx(row["kogpt_b1"] / 250.0)
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 3  # int8 and int8-dynamic share one Q8_0 run
    assert calls[0][calls[0].index("-p") + 1] == "127" and calls[0][calls[0].index("-n") + 1] == "96"
    assert calls[0][calls[0].index("-r") + 1] == "1" and calls[0][calls[0].index("-o") + 1] == "json"


@pytest.mark.parametrize("mode, reason", [("fail", "llama-bench exited 1: error: failed to load model"),
                                          ("garbage", "JSONDecodeError")])
def test_a_failing_llama_bench_is_noted_in_the_row(gpt2_dir, fake_llama, monkeypatch, mode, reason):
    from kogpt.apps.bench import format_table
    from kogpt.apps.llamacpp import measure_llama

    monkeypatch.setenv("FAKE_MODE", mode)
    out = measure_llama(str(fake_llama), gpt2_dir, "bf16", repeats=1)
    assert out["llama_format"] == "bf16" and reason in out["llama_error"] and "llama_b1" not in out
    row = {"dtype": "bf16", "kogpt_b1": 10.0, "kogpt_b8": 50.0, "kogpt_ttft": 0.1, "kogpt_load_s": 1.0,
           "kogpt_peak_rss_mb": 2.0, "kogpt_weights_mb": 1.0, "bandwidth_gbs": 10.0, "roofline_b1": 100.0, **out}
    table = format_table([row])
    assert "| bf16 |" in table and "| failed (" in table and "llama-bench build" not in table


def test_a_crashing_llama_bench_is_rerun_without_extra_buffers(gpt2_dir, fake_llama, tmp_path, monkeypatch):
    from kogpt.apps.bench import format_table
    from kogpt.apps.llamacpp import measure_llama

    monkeypatch.setenv("FAKE_MODE", "crash")
    out = measure_llama(str(fake_llama), gpt2_dir, "int8", repeats=1)
    assert out["llama_b1"] == 250.0 and "signal 11" in out["llama_note"] and "llama_error" not in out
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert "--repack" not in calls[0] and calls[1][-2:] == ["--repack", "0"]
    row = {"dtype": "int8", "kogpt_b1": 10.0, "kogpt_b8": 50.0, "kogpt_ttft": 0.1, "kogpt_load_s": 1.0,
           "kogpt_peak_rss_mb": 2.0, "kogpt_weights_mb": 1.0, "bandwidth_gbs": 10.0, "roofline_b1": 100.0, **out,
           "ratio_llama_b1": 0.04, "ratio_llama_ttft": 1.0}
    assert "llama.cpp Q8_0: killed by signal 11" in format_table([row])


def test_a_missing_llama_bench_is_a_user_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kogpt", "bench", "--model", str(tmp_path), "--llama-bench",
                        str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not an executable file" in r.stderr


@pytest.mark.skipif(LLAMA_BENCH is None, reason="llama-bench not built or on PATH")
@pytest.mark.parametrize("dtype", ["f32", "bf16", "q8_0", "q4_0"])
def test_real_llama_bench_loads_and_runs_the_export(gpt2_dir, tmp_path, dtype):
    path = write_gguf(gpt2_dir, tmp_path / f"m-{dtype}.gguf", dtype)
    cmd = [LLAMA_BENCH, "-m", str(path), "-p", "16", "-n", "8", "-r", "1", "-t", "1", "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode < 0:  # ggml's AMX Q8_0 matmul crashes on some AMX machines (llama.cpp #20824)
        r = subprocess.run(cmd + ["--repack", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    tests = json.loads(r.stdout)
    assert {(t["n_prompt"], t["n_gen"]) for t in tests} == {(16, 0), (0, 8)}
    assert all(t["avg_ts"] > 0 for t in tests)


@pytest.mark.skipif(LLAMA_BENCH is None, reason="llama-bench not built or on PATH")
def test_real_llama_bench_through_measure_llama(gpt2_dir):
    from kogpt.apps.llamacpp import measure_llama

    out = measure_llama(LLAMA_BENCH, gpt2_dir, "int8", repeats=1, timeout=300)
    assert "llama_error" not in out, out
    assert out["llama_format"] == "q8_0" and out["llama_b1"] > 0 and out["llama_ttft"] > 0


LLAMA_SIMPLE = LLAMA_BENCH and shutil.which("llama-simple", path=str(Path(LLAMA_BENCH).parent))


@pytest.mark.skipif(not LLAMA_SIMPLE, reason="llama.cpp's llama-simple not built next to llama-bench")
def test_llama_cpp_greedy_text_equals_kogpt(tmp_path):
    """The strongest proof of the export: llama.cpp tokenizes a Korean prompt with the exported
    byte-level vocabulary and greedily continues it to the same bytes kogpt generates."""
    from tokenizers import ByteLevelBPETokenizer

    from kogpt.generation.engine import generate_ids
    from kogpt.hf.gguf import _byte_symbols
    from kogpt.text.tokenizer import Tokenizer

    folder = tmp_path / "model"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(KOREAN_LINES * 3, vocab_size=600, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    make_hf_model("gpt2", seed=1, vocab_size=bpe.get_vocab_size()).save_pretrained(folder)  # peaked logits
    bpe.save(str(folder / "tokenizer.json"))
    tok, prompt = Tokenizer.from_dir(folder), "오늘 날씨가 정말"
    ids = tok.encode(prompt)
    new = generate_ids(load(folder, Layout(torch.float32)), [ids], max_new_tokens=24)[0]
    byte = {c: b for b, c in enumerate(_byte_symbols())}
    want = bytes(byte[c] for i in ids + new for c in tok.id_to_token(i))  # raw bytes: pieces may split a syllable
    path = write_gguf(folder, tmp_path / "m.gguf", "f32")
    r = subprocess.run([LLAMA_SIMPLE, "-m", str(path), "-n", "24", prompt], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == want.strip()

"""llama.cpp's numbers for `kogpt bench`: its own benchmark tools on the GGUF export of the same weights.

llama-bench gives batch-1 decode (tg, from an empty context) and prompt speed (pp, as time to first
token of the same long prompt); llama-batched-bench gives batch-8 decode: 8 sequences of kogpt
bench's 32-token prompt decoded together, 8 × new tokens over its total time, prompts included, as
kogpt's b8 counts its own prefill. A run killed by a signal is run once more without repacked
weights (ggml's AMX Q8_0/Q4_0 kernels die on some AMX CPUs); any failure comes back as a reason.

    out = measure_llama("llama-bench", folder, "bf16", batched="llama-batched-bench")
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from ..errors import UserError
from .bench import PROMPT, shape

SEQS = 8  # the b8 column's parallel sequences, as kogpt bench's b8
TRIES = 3  # llama-batched-bench's logger thread can drop its last lines at exit (never joined): run again


def gguf_dtype(dtype: str) -> str:
    """The GGUF type llama.cpp runs for a kogpt --dtype: its own 8- and 4-bit layouts for kogpt's int8 and int4."""
    return {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "q8_0", "int8-dynamic": "q8_0"}.get(dtype, "q4_0")


def measure_llama(binary: str | None, folder: Path, dtype: str, repeats: int = 3, timeout: float = 3600,
                  batched: str | None = None) -> dict:
    """llama.cpp on the GGUF export of `folder` (dtype as kogpt names it), exported once for both tools:
    with `binary` (llama-bench) `llama_b1` (tg tokens/s), `llama_ttft` (prompt length / pp tokens/s) and
    its build; with `batched` (llama-batched-bench) `llama_b8` and `llama_b8_tg` (see batched_bench).
    A failure of either comes back as `llama_error` / `llama_b8_error`, a rerun without repacking as
    `llama_note` / `llama_b8_note`."""
    from ..hf.gguf import write_gguf

    fmt = gguf_dtype(dtype)
    out: dict = {"llama_format": fmt}
    try:
        with tempfile.TemporaryDirectory(prefix="kogpt-gguf-") as tmp:
            path = write_gguf(folder, Path(tmp) / f"model-{fmt}.gguf", fmt, tokenizer=False)
            if binary:
                out.update(_guarded("llama_error", "llama-bench", timeout,
                                    lambda: llama_bench(binary, path, folder, repeats, timeout)))
            if batched:
                out.update(_guarded("llama_b8_error", "llama-batched-bench", timeout,
                                    lambda: batched_bench(batched, path, folder, repeats, timeout)))
    except (OSError, ImportError, UserError, ValueError) as e:  # the export: no gguf, a model it cannot write
        reason = f"{type(e).__name__}: {e}"[:300]
        out.update({key: reason for key, tool in (("llama_error", binary), ("llama_b8_error", batched)) if tool})
    return out


def llama_bench(binary: str, path: Path, folder: Path, repeats: int, timeout: float) -> dict:
    """llama-bench -p LONG -n NEW: batch-1 decode tokens/s and the long prompt's time to first token."""
    prompt, new = shape(folder)
    cmd = [binary, "-m", str(path), "-p", str(prompt), "-n", str(new), "-t", str(torch.get_num_threads()),
           "-r", str(repeats), "-o", "json"]
    r, out = _run(cmd, ["--repack", "0"], timeout, "llama_note")
    if r.returncode != 0:
        return {**out, "llama_error": f"llama-bench exited {r.returncode}: {_tail(r.stderr)}"[:300]}
    tests = json.loads(r.stdout)
    pp = next(t for t in tests if t["n_prompt"] == prompt and t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_gen"] == new and t["n_prompt"] == 0)
    return {**out, "llama_b1": float(tg["avg_ts"]), "llama_ttft": prompt / float(pp["avg_ts"]),
            "llama_build_commit": tests[0].get("build_commit"), "llama_build_number": tests[0].get("build_number")}


def batched_bench(binary: str, path: Path, folder: Path, repeats: int, timeout: float) -> dict:
    """llama-batched-bench on kogpt bench's b8 workload: 8 sequences, each its own 32-token prompt (one
    prompt pass, which yields each sequence's first new token, as kogpt's prefill does) and new - 1
    batched decode steps, so 8 × new tokens come out as in kogpt's b8. `llama_b8` = 8 × new / (T_PP +
    T_TG), the median of `repeats` runs after one warm-up run in the same process; `llama_b8_tg` its
    S_TG (decode steps only, prompts excluded)."""
    new = shape(folder)[1]
    cmd = [binary, "-m", str(path), "-c", str(SEQS * (PROMPT + new)), "-npp", ",".join([str(PROMPT)] * (repeats + 1)),
           "-ntg", str(new - 1), "-npl", str(SEQS), "-t", str(torch.get_num_threads()), "--output-format", "jsonl"]
    out: dict = {}
    for _ in range(TRIES):
        r, crashed = _run(cmd, ["--no-repack"], timeout, "llama_b8_note")
        out = out or crashed
        if r.returncode != 0:
            return {**out, "llama_b8_error": f"llama-batched-bench exited {r.returncode}: {_tail(r.stderr)}"[:300]}
        runs = parse_batched_bench(r.stdout)
        if len(runs) == repeats + 1:
            break
        if crashed:  # the next try goes straight to --no-repack
            cmd += ["--no-repack"]
    else:
        return {**out, "llama_b8_error": f"llama-batched-bench printed {len(runs)} of {repeats + 1} result lines "
                                         f"in {TRIES} runs"}
    runs = runs[1:]  # the first run warms up: it allocates the batch-8 buffers
    return {**out, "llama_b8": statistics.median(SEQS * new / run["t"] for run in runs),
            "llama_b8_tg": statistics.median(run["speed_tg"] for run in runs)}


def parse_batched_bench(text: str) -> list[dict]:
    """The batch-8 result lines of llama-batched-bench --output-format jsonl, in order; other lines are skipped."""
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [r for r in rows if r["pl"] == SEQS]


def _run(cmd: list[str], no_repack: list[str], timeout: float,
         note_key: str) -> tuple[subprocess.CompletedProcess, dict]:
    # ggml prints a gdb backtrace before it aborts unless told not to: the error line stays last
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode >= 0:
        return r, {}
    note = f"killed by signal {-r.returncode} with default buffers; rerun with {' '.join(no_repack)}"
    return subprocess.run(cmd + no_repack, capture_output=True, text=True, timeout=timeout, env=env), {note_key: note}


def _tail(stderr: str) -> str:
    return (stderr.strip().splitlines() or [""])[-1]


def _guarded(key: str, tool: str, timeout: float, measure) -> dict:
    try:
        return measure()
    except subprocess.TimeoutExpired:
        return {key: f"{tool} timed out after {timeout:.0f} s"}
    except (OSError, ValueError, KeyError, TypeError, StopIteration, ZeroDivisionError) as e:
        # OSError: binary not runnable; ValueError: bad JSON; the rest: JSON of an unexpected shape
        return {key: f"{type(e).__name__}: {e}"[:300]}


def cells(r: dict, batched: bool) -> str:
    """The llama.cpp cells of a kogpt bench table row: b1, (with `batched`) b8, TTFT, each with kogpt's ratio."""
    fmt = r.get("llama_format", "").upper()
    b1 = (f"{fmt}: {r['llama_b1']:.1f} ({r['ratio_llama_b1']:.2f}×)" if "llama_b1" in r
          else _failed(r["llama_error"]) if "llama_error" in r else "–")
    ttft = f"{r['llama_ttft']:.3f} ({r['ratio_llama_ttft']:.2f}×)" if "llama_ttft" in r else "–"
    if not batched:
        return f" {b1} | {ttft} |"
    b8 = (f"{fmt}: {r['llama_b8']:.1f} ({r['ratio_llama_b8']:.2f}×)" if "llama_b8" in r
          else _failed(r["llama_b8_error"]) if "llama_b8_error" in r else "–")
    return f" {b1} | {b8} | {ttft} |"


def _failed(reason: str) -> str:
    return f"failed ({reason.replace('|', '/')[:80]})"


def notes(rows: list[dict]) -> list[str]:
    """The lines under a kogpt bench table that say what llama.cpp ran and where it needed a rerun."""
    lines = []
    build = next((r for r in rows if r.get("llama_build_commit") is not None), None)
    if build:
        lines.append(f"llama.cpp: llama-bench build {build['llama_build_number']} ({build['llama_build_commit']}) on the "
                     "GGUF export of the same weights; tg from an empty context, TTFT = prompt tokens / pp tok/s")
    if any("llama_b8" in r for r in rows):
        lines.append(f"llama.cpp b8: llama-batched-bench, {SEQS} sequences of {PROMPT}-token prompts and new - 1 decode "
                     f"steps; {SEQS} × new tokens / (T_PP + T_TG), prompts included as in kogpt's b8")
    for key, tool in (("llama_note", ""), ("llama_b8_note", " b8")):
        for fmt, note in dict.fromkeys((r["llama_format"], r[key]) for r in rows if key in r):
            lines.append(f"llama.cpp{tool} {fmt.upper()}: {note}")
    return lines

"""Speed and memory of kogpt against transformers on the same weights, measured in one run.

For each dtype: batch-1 and batch-8 greedy decode tokens/s (32-token prompts, 128 new tokens),
time to first token of a 512-token prompt, and load time and peak RSS (each load in a fresh
subprocess). kogpt and transformers alternate within every repetition and the median is reported,
so machine noise hits both alike; ratios are kogpt / transformers (time ratios: lower is better).

Batch-1 decode reads every weight once per token, so it is bounded by memory bandwidth: the table's
roofline column is the machine's measured read bandwidth (measure_bandwidth) divided by the weight
bytes a decode step reads, and the share of it each engine reaches. A second table splits kogpt's
batch-1 step into its linear layers, timed alone (time_linears), and the rest: what kernels bound and
what the per-token work around them costs.

Given llama.cpp's `llama-bench` and/or `llama-batched-bench`, GPT-2-family rows also carry llama.cpp's
numbers on the GGUF export of the same weights (fp32 -> F32, bf16 -> BF16, fp16 -> F16, int8 -> Q8_0,
int4 -> Q4_0; llamacpp.py): batch-1 decode, time to first token of the same long prompt, and batch-8
decode of the same 8 × 32-token prompts and new tokens.

    rows = run_bench(folder, dtypes=["fp32", "bf16", "int8"]); print(format_table(rows))
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPT, NEW, LONG = 32, 128, 512  # decode prompt, new tokens per sequence, TTFT prompt (capped by the context)
_PEER_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the integer layouts: fp32


def make_random_checkpoint(folder: Path, preset: str, dtype: str = "fp32", seed: int = 0) -> Path:
    """A random-init transformers model of a kogpt preset's shape, saved with save_pretrained."""
    import transformers

    from ..core.config import GPTConfig
    from ..hf.convert import config_to_hf

    if (folder / "config.json").exists():
        return folder
    d = config_to_hf(GPTConfig.preset(preset))
    hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **{k: v for k, v in d.items() if k != "architectures"})
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=_PEER_DTYPE.get(dtype, torch.float32))
    model.save_pretrained(folder)
    return folder


def param_bytes(dtype: str) -> float:
    """Bytes a decode step reads per weight in a --dtype layout (int4: 4 bits plus a bf16 scale and zero a group)."""
    from ..core.dtypes import int4_group

    group = int4_group(dtype)
    if group:
        return 0.5 + 4 / group
    return {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int8-dynamic": 1}[dtype]


def measure_bandwidth(gib: float = 1.0, repeats: int = 3) -> float:
    """Memory read bandwidth in GB/s with the current torch threads: the best of a sum and an fp32
    GEMV over `gib` GiB (far larger than any cache), best of `repeats`."""
    n = int(gib * (1 << 30)) // 4
    a = torch.ones(n)
    w, x = a.view(-1, 1024), torch.ones(1024)
    best = 0.0
    for f in (a.sum, lambda: w @ x):
        f()
        for _ in range(repeats):
            best = max(best, n * 4 / _time(f) / 1e9)
    return best


def decode_bytes(folder: Path, dtype: str) -> int:
    """Weight bytes one batch-1 decode step reads: every linear layer and the output head (one
    embedding row per token is negligible)."""
    from ..hf.folder import load_config

    c = load_config(folder)
    per_layer = 4 * c.n_embd * c.n_embd + 2 * c.n_embd * c.mlp_dim  # qkv, proj, fc, mlp proj
    return int((c.n_layer * per_layer + c.vocab_size * c.n_embd) * param_bytes(dtype))


def linear_layers(model) -> list:
    """The linear layers one decode step runs, in model order, whatever their layout (nn.Linear,
    oneDNN-packed, int8, int4): every module with in_features and out_features (a tied head counts once
    more, as the step reads it again)."""
    return [m for m in model.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]


def time_linears(model, batch: int, steps: int) -> float:
    """Seconds that `steps` decode steps spend in their linear layers alone: each layer once per step
    on a random (batch, 1, in_features) input, back to back. A full step takes this plus the rest
    (attention, norms, cache writes, sampling, Python)."""
    layers = linear_layers(model)
    dtype, device = model.wte.weight.dtype, model.wte.weight.device
    xs = [torch.randn(batch, 1, m.in_features, dtype=dtype, device=device) for m in layers]

    def run(n: int) -> None:
        for _ in range(n):
            for m, x in zip(layers, xs):
                m(x)

    with torch.inference_mode():
        run(1)  # warm-up: first calls pick kernels
        return _time(lambda: run(steps))


def _kogpt(folder: Path, dtype: str, compile: bool = False):
    from ..core.layout import Layout
    from ..hf.load import load

    return load(folder, Layout.parse(dtype, plain=compile), "cpu")


def _kogpt_generate(model, ids: torch.Tensor, n: int, step_fn=None):
    from ..generation.engine import decode_step, generate_ids

    return generate_ids(model, ids.tolist(), max_new_tokens=n, step_fn=step_fn or decode_step)


def _hf(folder: Path, dtype: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=_PEER_DTYPE.get(dtype, torch.float32)).eval()


def _hf_generate(model, ids: torch.Tensor, n: int):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, pad_token_id=0)


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure_speed(folder: Path, dtype: str, repeats: int = 3, peer: bool = True, compile: bool = False) -> dict:
    """Decode tokens/s (batch 1 and 8) and time to first token, kogpt (with compile: its torch.compile'd
    decode step, compiled during the warm-up) and (optionally) transformers; for eager kogpt also
    linears_b1, the batch-1 tokens/s of its linear layers alone (time_linears)."""
    from ..core.dtypes import QUANTIZED
    from ..hf.folder import read_json

    vocab = read_json(folder / "config.json")["vocab_size"]
    n_long, new = shape(folder)
    g = torch.Generator().manual_seed(0)
    ids1, ids8 = torch.randint(5, vocab, (1, PROMPT), generator=g), torch.randint(5, vocab, (8, PROMPT), generator=g)
    long = torch.randint(5, vocab, (1, n_long), generator=g)
    gen = _kogpt_generate
    if compile:
        from ..generation.compiled_step import CompiledStep

        step = CompiledStep()
        gen = lambda model, ids, n: _kogpt_generate(model, ids, n, step)  # noqa: E731
    engines = {"kogpt": (_kogpt(folder, dtype, compile), gen)}
    if peer and dtype not in QUANTIZED:
        engines["transformers"] = (_hf(folder, dtype), _hf_generate)
    for model, gen in engines.values():  # warm-up: first calls allocate and pick kernels (and compile)
        gen(model, ids1, 4)
        gen(model, ids8, 2)
        gen(model, long[:, :64], 1)
    samples: dict[str, dict[str, list[float]]] = {e: {"b1": [], "b8": [], "ttft": []} for e in engines}
    if not compile:  # batch-1 tokens/s of the linear layers alone: the step's speed if the rest cost nothing
        samples["kogpt"]["linears_b1"] = []
    for _ in range(repeats):
        for name, (model, gen) in engines.items():
            samples[name]["b1"].append(new / _time(lambda: gen(model, ids1, new)))
            samples[name]["b8"].append(8 * new / _time(lambda: gen(model, ids8, new)))
            samples[name]["ttft"].append(_time(lambda: gen(model, long, 1)))
            if "linears_b1" in samples[name]:
                samples[name]["linears_b1"].append(new / time_linears(model, 1, new))
    return {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}


_LOAD_SCRIPT = """
import sys, time, json
from pathlib import Path
import torch
def status(key):  # kB from /proc (ru_maxrss would be inherited from the parent across fork + exec)
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
base = status("VmRSS:")
which, folder, dtype = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
from kogpt.apps import bench
t = time.perf_counter()
model = bench._kogpt(folder, dtype) if which == "kogpt" else bench._hf(folder, dtype)
dt = time.perf_counter() - t
peak = status("VmHWM:")
tensors = {t.data_ptr(): t for t in model.state_dict().values()}  # tied weights once; oneDNN-packed layers report dense
weights = sum(t.numel() * t.element_size() for t in tensors.values())
print(json.dumps({"load_s": dt, "peak_rss_mb": (peak - base) / 1024, "weights_mb": weights / 2**20}))
"""


def measure_load(folder: Path, dtype: str, which: str) -> dict:
    """Load time and peak RSS growth of one load in a fresh process (imports excluded)."""
    r = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, which, str(folder), dtype],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"load benchmark failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def shape(folder: Path) -> tuple[int, int]:
    """The TTFT prompt length and the new tokens per sequence, LONG and NEW capped by the context
    (tiny test shapes have short ones)."""
    from ..hf.folder import read_json

    ctx = read_json(folder / "config.json").get("n_positions", 2048)
    return min(LONG, ctx - 1), min(NEW, ctx - PROMPT)


def run_bench(folder: Path, dtypes=("fp32", "bf16", "int8"), repeats: int = 3, peer: bool = True,
              log=print, llama_bench: str | None = None, compile: bool = False,
              llama_batched: str | None = None) -> list[dict]:
    """One row per dtype with kogpt and transformers numbers and their ratios (and llama.cpp's, when
    `llama_bench` / `llama_batched` are the paths of llama-bench / llama-batched-bench and the model is
    GPT-2 family); with compile, a second row per float dtype for kogpt's torch.compile'd decode step
    against the same peer."""
    from ..core.dtypes import QUANTIZED
    from ..hf.folder import load_config
    from .llamacpp import gguf_dtype, measure_llama

    rows, peer_speed, llama = [], {}, {}
    if (llama_bench or llama_batched) and load_config(folder).family != "gpt2":
        log("llama.cpp: GGUF export supports the GPT-2 family; skipped")
        llama_bench = llama_batched = None
    log("memory bandwidth ...")
    bandwidth = measure_bandwidth()
    for dtype in dtypes:
        log(f"[{dtype}] decode speed ...")
        speed = measure_speed(folder, dtype, repeats, peer)
        if "transformers" in speed:
            peer_speed[dtype] = speed["transformers"]
        row = {"dtype": dtype, **{f"kogpt_{k}": v for k, v in speed["kogpt"].items()},
               "bandwidth_gbs": bandwidth, "roofline_b1": bandwidth * 1e9 / decode_bytes(folder, dtype)}
        log(f"[{dtype}] load time and peak RSS ...")
        row.update({f"kogpt_{k}": v for k, v in measure_load(folder, dtype, "kogpt").items()})
        peer_dtype = "fp32" if dtype in QUANTIZED else dtype  # int8 and int4 are compared with transformers fp32
        if peer:
            if peer_dtype not in peer_speed:
                peer_speed[peer_dtype] = measure_speed(folder, peer_dtype, repeats)["transformers"]
            row.update({f"hf_{k}": v for k, v in peer_speed[peer_dtype].items()})
            row.update({f"hf_{k}": v for k, v in measure_load(folder, peer_dtype, "transformers").items()})
            row["peer_dtype"] = peer_dtype
            for k in ("b1", "b8"):
                row[f"ratio_{k}"] = row[f"kogpt_{k}"] / row[f"hf_{k}"]
            for k in ("ttft", "load_s"):
                row[f"ratio_{k}"] = row[f"kogpt_{k}"] / row[f"hf_{k}"]
        if llama_bench or llama_batched:
            fmt = gguf_dtype(dtype)
            if fmt not in llama:  # int8 and int8-dynamic share one Q8_0 run, the int4 group sizes one Q4_0 run
                tools = " and ".join(t for t, on in (("llama-bench", llama_bench),
                                                     ("llama-batched-bench", llama_batched)) if on)
                log(f"[{dtype}] llama.cpp {tools} ({fmt.upper()}) ...")
                llama[fmt] = measure_llama(llama_bench, folder, dtype, repeats, batched=llama_batched)
                for key in ("llama_error", "llama_b8_error"):
                    if key in llama[fmt]:
                        log(f"[{dtype}] llama.cpp failed: {llama[fmt][key]}")
            row.update(llama[fmt])
            if "llama_b1" in row:
                row["ratio_llama_b1"] = row["kogpt_b1"] / row["llama_b1"]
                row["ratio_llama_ttft"] = row["kogpt_ttft"] / row["llama_ttft"]
            if "llama_b8" in row:
                row["ratio_llama_b8"] = row["kogpt_b8"] / row["llama_b8"]
        rows.append(row)
        if compile and dtype not in QUANTIZED:  # int8 and int4 layers are opaque to torch.compile
            log(f"[{dtype} compiled] decode speed ...")
            fast = measure_speed(folder, dtype, repeats, peer=False, compile=True)["kogpt"]
            crow = {**{k: v for k, v in row.items() if k.startswith(("dtype", "hf_", "peer_", "bandwidth", "roofline"))},
                    "compiled": True, **{f"kogpt_{k}": v for k, v in fast.items()}}
            for k in ("b1", "b8", "ttft"):  # load time and RSS: the eager row's (the same weights, unpacked)
                if f"hf_{k}" in crow:
                    crow[f"ratio_{k}"] = crow[f"kogpt_{k}"] / crow[f"hf_{k}"]
            rows.append(crow)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table: one line per dtype, kogpt / transformers and the ratio for each measure."""
    from . import llamacpp

    head = ("| dtype | decode b1 tok/s (× hf) | roofline b1 tok/s: kogpt, hf | decode b8 tok/s (× hf) "
            "| TTFT 512 s (× hf) | load s (× hf) | peak RSS / weights |\n|---|---|---|---|---|---|---|")
    with_llama = any("llama_format" in r for r in rows)
    batched = any("llama_b8" in r or "llama_b8_error" in r for r in rows)
    if with_llama:
        b8 = " llama.cpp b8 tok/s (kogpt ×) |" if batched else ""
        head = (head.replace(" |\n|", f" | llama.cpp b1 tok/s (kogpt ×) |{b8} llama.cpp TTFT 512 s (kogpt ×) |\n|")
                + "---|---|" + "---|" * batched)
    lines = [head]
    for r in rows:
        def cell(k, fmt):
            if f"kogpt_{k}" not in r:
                return "–"
            if f"hf_{k}" not in r:
                return format(r[f"kogpt_{k}"], fmt)
            return f"{r[f'kogpt_{k}']:{fmt}} / {r[f'hf_{k}']:{fmt}} ({r[f'ratio_{k}']:.2f}×)"
        peer = f" vs hf {r['peer_dtype']}" if r.get("peer_dtype", r["dtype"]) != r["dtype"] else ""
        rss = f"{r['kogpt_peak_rss_mb'] / max(r['kogpt_weights_mb'], 1e-9):.2f}" if "kogpt_peak_rss_mb" in r else "–"
        roof = f"{r['roofline_b1']:.0f}: {r['kogpt_b1'] / r['roofline_b1']:.0%}"
        if "hf_b1" in r:
            hf_roofline = r["roofline_b1"] * param_bytes(r["dtype"]) / param_bytes(r.get("peer_dtype", r["dtype"]))
            roof += f", {r['hf_b1'] / hf_roofline:.0%}"
        name = r["dtype"] + (" compiled" if r.get("compiled") else "")
        line = (f"| {name}{peer} | {cell('b1', '.1f')} | {roof} | {cell('b8', '.1f')} | {cell('ttft', '.3f')} "
                f"| {cell('load_s', '.2f')} | {rss} |")
        if with_llama:
            line += llamacpp.cells(r, batched)
        lines.append(line)
    if rows:
        lines.append(f"\nroofline: {rows[0]['bandwidth_gbs']:.1f} GB/s measured read bandwidth / weight bytes per "
                     "decode step (hf: of its own dtype's roofline)")
    lines += llamacpp.notes(rows)
    split = format_step_split(rows)
    return "\n".join(lines) + ("\n\n" + split if split else "")


def format_step_split(rows: list[dict]) -> str:
    """Markdown table of where kogpt's batch-1 decode step goes: its linear layers (and the read
    bandwidth they reach) and everything else; the last column is the step's speed if the rest cost nothing."""
    lines = ["| dtype | b1 step ms | linear layers ms (GB/s) | rest ms | b1 tok/s with the rest at 0 |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "kogpt_linears_b1" not in r:
            continue
        step, lin = 1e3 / r["kogpt_b1"], 1e3 / r["kogpt_linears_b1"]
        gbs = r["bandwidth_gbs"] / r["roofline_b1"] * r["kogpt_linears_b1"]  # bytes per step × steps/s
        lines.append(f"| {r['dtype']} | {step:.2f} | {lin:.2f} ({gbs:.1f}) | {step - lin:.2f} "
                     f"| {r['kogpt_linears_b1']:.1f} |")
    return "\n".join(lines) if len(lines) > 2 else ""

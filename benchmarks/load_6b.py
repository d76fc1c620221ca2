"""Low-memory loading of the full KoGPT 6B shape (GPT-J, 28 layers, n_embd 4096, bf16, ~12 GB).

Writes a random-init checkpoint in HF format (sharded safetensors, one tensor at a time, so writing
never holds the model either), then measures in fresh processes, kogpt (in each --dtype) and transformers
(bf16) on the same folder: load time, peak RSS against the weights' bytes (the bf16 files; for int4 the
bytes the loaded model holds), and batch-1 decode tokens/s after a 32-token prompt (the prompt's time taken
out), each kogpt row also against kogpt bf16's.

    python benchmarks/load_6b.py --folder /tmp/kogpt-6b-random          # ~12 GB of disk
    python benchmarks/load_6b.py --only kogpt --dtype bf16 --dtype int4  # KoGPT 6B in int4 vs bf16, one run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from kogpt.core.config import GPTConfig
from kogpt.hf.convert import config_to_hf, name_map

_MEASURE = """
import json, sys, time
import torch
from pathlib import Path
def status(key):  # kB from /proc (ru_maxrss is inherited from the parent across fork + exec)
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
which, folder, new, dtype = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
base = status("VmRSS:")
t = time.perf_counter()
held = None
if which == "kogpt":
    from kogpt.hf.load import load
    from kogpt.generation.engine import generate_ids
    model = load(folder, dtype)
    run = lambda ids, n: generate_ids(model, ids.tolist(), max_new_tokens=n)
    if dtype.startswith("int4"):  # every tensor is a parameter or buffer (oneDNN-packed bf16 layers are not)
        tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
        held = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**30
else:
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    def run(ids, n):
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=0)
load = time.perf_counter() - t
load_peak = (status("VmHWM:") - base) / 2**20
ids = torch.randint(5, 60000, (1, 32))
run(ids, 2)  # transformers maps the files lazily: its pages come in on first use
t = time.perf_counter()
run(ids, 1)  # the 32-token prompt and the first token
t1 = time.perf_counter()
run(ids, 1 + new)
tok_s = new / (time.perf_counter() - t1 - (t1 - t))  # decode only: the prompt's time taken out
peak = (status("VmHWM:") - base) / 2**20
print(json.dumps({"load_s": load, "load_peak_rss_gb": load_peak, "peak_rss_gb": peak, "tok_s": tok_s, "weights_gb": held}))
"""


def write_random_checkpoint(folder: Path, layers_per_shard: int = 2, seed: int = 0) -> float:
    """HF-format GPT-J 6B with random bf16 weights; returns the weights' size in GB."""
    cfg = GPTConfig.preset("kogpt-6b")
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    names = name_map(cfg)  # kogpt name -> (HF names, transpose?)
    shards: dict[str, list[str]] = {}
    for ours in names:
        layer = int(ours.split(".")[1]) if ours.startswith("h.") else -1
        shard = "other" if layer < 0 else f"{layer // layers_per_shard}"
        shards.setdefault(shard, []).append(ours)
    with torch.device("meta"):
        from kogpt.core.model import GPT

        shapes = {n: p.shape for n, p in GPT(cfg).named_parameters()}
    weight_map, total = {}, 0
    for i, (shard, ours_names) in enumerate(shards.items()):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for ours in ours_names:
            theirs, transpose = names[ours]
            full = (torch.randn(shapes[ours], generator=g) * 0.02).to(torch.bfloat16)
            parts = full.chunk(len(theirs), 0) if len(theirs) > 1 else [full]
            for t, p in zip(theirs, parts):
                tensors[t] = (p.t() if transpose else p).contiguous()
                weight_map[t] = fname
                total += p.numel() * 2
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        print(f"wrote {fname} ({len(tensors)} tensors)", flush=True)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg, torch.bfloat16), indent=2))
    return total / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=Path("/tmp/kogpt-6b-random"))
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--only", choices=["kogpt", "transformers"], default=None)
    ap.add_argument("--dtype", action="append", choices=["bf16", "int4", "int4-g64", "int4-g128"], default=None,
                    help="kogpt's layouts to measure (repeatable; default bf16); transformers runs bf16")
    args = ap.parse_args()
    if not (args.folder / "config.json").exists():
        gb = write_random_checkpoint(args.folder)
        print(f"random KoGPT-6B checkpoint: {gb:.2f} GB in {args.folder}")
    weights_gb = json.loads((args.folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"] / 2**30
    runs = [] if args.only == "transformers" else [("kogpt", d) for d in args.dtype or ["bf16"]]
    if args.only != "kogpt":
        runs.append(("transformers", "bf16"))
    rows = {}
    for which, dtype in runs:
        r = subprocess.run([sys.executable, "-c", _MEASURE, which, str(args.folder), str(args.new_tokens), dtype],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{which} {dtype} failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-3:]}")
            continue
        rows[which, dtype] = json.loads(r.stdout.strip().splitlines()[-1])
        print(which, dtype, rows[which, dtype], flush=True)
    bf16 = rows.get(("kogpt", "bf16"), {}).get("tok_s")
    print(f"\n| engine | load s | peak RSS GB after load / after decoding (× the weights: {weights_gb:.2f} GB in bf16) "
          f"| decode tok/s (× kogpt bf16) |\n|---|---|---|---|")
    for (which, dtype), m in rows.items():
        weights = m["weights_gb"] or weights_gb
        held = f"; {weights:.2f} GB held" if m["weights_gb"] else ""
        speed = f"{m['tok_s']:.2f}" + (f" ({m['tok_s'] / bf16:.2f}×)" if bf16 and which == "kogpt" else "")
        print(f"| {which} {dtype} | {m['load_s']:.1f} | {m['load_peak_rss_gb']:.2f} / {m['peak_rss_gb']:.2f} "
              f"({m['peak_rss_gb'] / weights:.2f}×{held}) | {speed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Finetuning memory and speed: kogpt's LoRA and full finetuning vs transformers (+ peft), and one LoRA step
of the KoGPT 6B shape on a CPU.

Every row runs in a fresh process (peak RSS is the process's VmHWM: what the machine must have).

- `--part base`: the KoGPT2-base shape (random weights, the real KoGPT2 tokenizer, Korean Wikipedia text
  from ../shared/data), batch x seq tokens per step, bf16 autocast, AdamW, grad clip 1.0, no dropout, on
  both sides:
  kogpt full (fp32 weights), kogpt LoRA (frozen bf16 base, fp32 adapters), transformers full (fp32),
  transformers + peft LoRA (bf16 base, peft's fp32 adapters), the same adapter targets (every attention and
  MLP projection) and rank. Rows alternate over --repeats rounds; tokens/s is the median round's.
- `--part 6b`: the KoGPT 6B shape (GPT-J, random bf16 weights written by load_6b.py), batch 1, seq 256,
  LoRA r=8 with gradient checkpointing: peak RSS over the bf16 weight bytes and seconds per step.

    .venv/bin/python benchmarks/finetune_memory.py --part base
    .venv/bin/python benchmarks/finetune_memory.py --part 6b --folder /tmp/kogpt-6b-random   # ~12 GB of disk
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

_MEASURE = r"""
import json, statistics, sys, time
import numpy as np
import torch
def status(key):  # kB from /proc
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
which, folder, data, a = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
torch.set_num_threads(a["threads"])
torch.manual_seed(0)
tokens = torch.from_numpy(np.load(data)) if data != "-" else None
B, T, r = a["batch"], a["seq"], a["r"]
def batch(step):
    if tokens is None:
        return torch.randint(0, a["vocab"], (B, T + 1), generator=torch.Generator().manual_seed(step))
    n = B * (T + 1)
    return tokens[step * n % (len(tokens) - n):][:n].view(B, T + 1).long()
autocast = torch.autocast("cpu", dtype=torch.bfloat16)
if which.startswith("kogpt"):
    from kogpt.core.layout import Layout
    from kogpt.hf.load import load
    from kogpt.training.config import TrainConfig
    from kogpt.training.lora import load_lora_base
    from kogpt.training.loss import LMLoss
    from kogpt.training.optim import make_optimizer
    if which == "kogpt-lora":
        model = load_lora_base(folder, TrainConfig(lora_r=r, lora_alpha=2.0 * r), "cpu")
    else:
        model = load(folder, Layout(torch.float32))
    model.grad_checkpoint = a["grad_checkpoint"]
    net = LMLoss(model).train()
    opt = make_optimizer(net, lr=1e-4, weight_decay=0.0)
    loss_of = lambda b: net(b)
else:
    import transformers
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # kogpt's rows train without dropout too
    if which == "hf-peft":
        import peft
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **no_dropout)
        targets = ["c_attn", "c_proj", "c_fc"] if model.config.model_type == "gpt2" else [
            "q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                           fan_in_fan_out=model.config.model_type == "gpt2",
                                                           task_type="CAUSAL_LM"))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **no_dropout)
    if a["grad_checkpoint"]:
        model.gradient_checkpointing_enable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    # T positions predicting the next T tokens, as LMLoss does; transformers' own loss: fp32 logits, cross-entropy
    loss_of = lambda b: torch.nn.functional.cross_entropy(
        model(input_ids=b[:, :-1]).logits.float().flatten(0, 1), b[:, 1:].flatten())
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
load_peak = status("VmHWM:") / 2**20
times, losses = [], []
for step in range(a["warmup"] + a["steps"]):
    b = batch(step)
    t = time.perf_counter()
    with autocast:
        loss = loss_of(b)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if step >= a["warmup"]:
        times.append(time.perf_counter() - t)
    losses.append(loss.item())
print(json.dumps({"step_s": statistics.median(times), "tok_s": B * T / statistics.median(times),
                  "peak_rss_gb": status("VmHWM:") / 2**20, "load_peak_rss_gb": load_peak, "trainable": trainable,
                  "first_loss": losses[0], "last_loss": losses[-1]}))
"""


def measure(which: str, folder: Path, data: str, **kw) -> dict:
    r = subprocess.run([sys.executable, "-c", _MEASURE, which, str(folder), data, json.dumps(kw)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{which} failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def base_part(args) -> None:
    """The KoGPT2-base table: four rows (five with --grad-checkpoint rows), --repeats alternating rounds."""
    import numpy as np
    import transformers

    from kogpt.core.config import GPTConfig
    from kogpt.hf.convert import config_to_hf
    from kogpt.text.tokenizer import Tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="kogpt-ftmem-"))
    cfg = GPTConfig.preset("kogpt2-base-v2")
    hf_cfg = transformers.GPT2Config(**{k: v for k, v in config_to_hf(cfg).items() if k != "architectures"})
    transformers.set_seed(0)
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp / "base")
    tok = Tokenizer.from_dir(SHARED / "tokenizer" / "kogpt2-v1")
    text = (SHARED / "corpus" / "kowiki" / "kowiki_sample.txt").read_text(encoding="utf-8")[:2_000_000]
    ids = np.array(tok.encode(text), dtype=np.int32)
    np.save(tmp / "tokens.npy", ids)
    kw = dict(batch=args.batch_size, seq=args.seq_len, r=args.lora_r, steps=args.steps, warmup=args.warmup,
              threads=args.threads, vocab=cfg.vocab_size, grad_checkpoint=False)
    rows = ["kogpt-full", "hf-full", "kogpt-lora", "hf-peft"]
    runs: dict[str, list[dict]] = {w: [] for w in rows}
    for rnd in range(args.repeats):
        for which in rows if rnd % 2 == 0 else rows[::-1]:
            runs[which].append(m := measure(which, tmp / "base", str(tmp / "tokens.npy"), **kw))
            print(which, json.dumps(m), flush=True)
    med = {w: sorted(rs, key=lambda m: m["tok_s"])[len(rs) // 2] for w, rs in runs.items()}
    print(f"\nKoGPT2-base shape, batch {args.batch_size} x seq {args.seq_len}, bf16 autocast, LoRA r={args.lora_r} on "
          f"attention and MLP, {args.threads} threads; median of {args.repeats} rounds\n")
    print("| run | trainable params | tokens/s | × transformers | peak RSS GB | × transformers | loss first → last |")
    print("|---|---|---|---|---|---|---|")
    for ours, theirs in (("kogpt-full", "hf-full"), ("kogpt-lora", "hf-peft")):
        for w in (ours, theirs):
            m, ref = med[w], med[theirs]
            ratio = lambda k: "" if w == theirs else f"{m[k] / ref[k]:.2f}×"  # noqa: E731
            print(f"| {w} | {m['trainable'] / 1e6:.2f}M | {m['tok_s']:.0f} | {ratio('tok_s')} | "
                  f"{m['peak_rss_gb']:.2f} | {ratio('peak_rss_gb')} | {m['first_loss']:.3f} → {m['last_loss']:.3f} |")


def six_b_part(args) -> None:
    """One LoRA step (after --warmup) of the KoGPT 6B shape, batch 1 x --seq-len, gradient checkpointing."""
    sys.path.insert(0, str(Path(__file__).parent))
    from load_6b import write_random_checkpoint

    if not (args.folder / "config.json").exists():
        print(f"random KoGPT-6B checkpoint: {write_random_checkpoint(args.folder):.2f} GB in {args.folder}")
    weights_gb = json.loads((args.folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"] / 2**30
    vocab = json.loads((args.folder / "config.json").read_text())["vocab_size"]
    m = measure("kogpt-lora", args.folder, "-", batch=1, seq=args.seq_len, r=args.lora_r, steps=args.steps,
                warmup=args.warmup, threads=args.threads, vocab=vocab, grad_checkpoint=not args.no_grad_checkpoint)
    print(json.dumps(m))
    print(f"\nKoGPT 6B shape (GPT-J, random bf16 weights {weights_gb:.2f} GiB), LoRA r={args.lora_r} on attention and "
          f"MLP, batch 1 x seq {args.seq_len}, gradient checkpointing {'off' if args.no_grad_checkpoint else 'on'}, "
          f"{args.threads} threads\n")
    print("| trainable params | peak RSS GiB after load | peak RSS GiB | × bf16 weights | s / step |\n|---|---|---|---|---|")
    print(f"| {m['trainable'] / 1e6:.2f}M | {m['load_peak_rss_gb']:.2f} | {m['peak_rss_gb']:.2f} | "
          f"{m['peak_rss_gb'] / weights_gb:.2f}× | {m['step_s']:.1f} |")


def main() -> int:
    import os

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["base", "6b"], default="base")
    ap.add_argument("--folder", type=Path, default=Path("/tmp/kogpt-6b-random"), help="6B checkpoint (written if missing)")
    ap.add_argument("--batch-size", type=int, default=8, help="base part; the 6B part runs batch 1")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--repeats", type=int, default=3, help="base part: alternating rounds")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-grad-checkpoint", action="store_true", help="6B part: keep every activation")
    args = ap.parse_args()
    (base_part if args.part == "base" else six_b_part)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

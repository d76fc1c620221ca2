"""Training speed: kogpt's training step vs a plain loop over transformers GPT2LMHeadModel, one run.

Same GPT-2 shape, batch, sequence length, optimizer (fused AdamW, grad clipping) and dtype (bf16
autocast over fp32 weights) on both sides; rounds alternate between the two so that a busy machine
slows both alike, and the median step time of each is reported with tokens/s, the ratio, and MFU
against the measured peak bf16 matmul FLOP/s (6N + 12·L·C·T FLOPs per token).

    .venv/bin/python benchmarks/train_speed.py --n-layer 6 --n-embd 384 --seq-len 256 --batch-size 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kogpt.core.config import GPTConfig
from kogpt.core.model import GPT
from kogpt.training.optim import flops_per_token, make_optimizer, measure_peak_flops
from kogpt.training.loss import LMLoss
from kogpt.training.loop import train_step
from kogpt.training.pretrain import LMObjective


class _HF:  # a plain transformers loop: labels= and the model's own shifted loss
    @staticmethod
    def loss(model, batch):
        return model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss


def kogpt_model(cfg: GPTConfig, compile: bool):
    torch.manual_seed(0)
    net = LMLoss(GPT(cfg)).train()  # what LMObjective.wrap gives the train loop
    return net, (torch.compile(net) if compile else net)


def hf_model(cfg: GPTConfig):
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # kogpt has no dropout
        bos_token_id=0, eos_token_id=1))
    return hf.train(), hf.train()


def run_steps(fwd, raw, opt, task, batches, autocast) -> list[float]:
    times = []
    for b in batches:
        t0 = time.perf_counter()
        train_step(fwd, raw, opt, task, [b], autocast, grad_clip=1.0)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--vocab-size", type=int, default=16000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (the first is warm-up)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--compile", action="store_true", help="also time kogpt with torch.compile")
    args = p.parse_args()

    cfg = GPTConfig(vocab_size=args.vocab_size, n_positions=max(1024, args.seq_len), n_embd=args.n_embd,
                    n_layer=args.n_layer, n_head=args.n_head)
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=g)
               for _ in range(args.steps)]
    sides = {"kogpt": (*kogpt_model(cfg, False), LMObjective), "transformers": (*hf_model(cfg), _HF)}
    if args.compile:
        sides["kogpt+compile"] = (*kogpt_model(cfg, True), LMObjective)
    opts = {k: make_optimizer(raw, lr=3e-4, weight_decay=0.1) for k, (raw, _, _) in sides.items()}
    times: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name, (raw, fwd, task) in sides.items():
            t = run_steps(fwd, raw, opts[name], task, batches, autocast)
            if r:  # round 0 warms up (and compiles)
                times[name] += t
    peak = measure_peak_flops(dtype)
    tokens = args.batch_size * args.seq_len
    fpt = flops_per_token(cfg, args.seq_len)
    print(f"GPT-2 {cfg.n_layer}L {cfg.n_embd}C {cfg.n_head}H vocab {cfg.vocab_size}, {cfg.num_params() / 1e6:.1f}M "
          f"params; batch {args.batch_size} × {args.seq_len}; {args.dtype} autocast; {torch.get_num_threads()} threads; "
          f"peak {peak / 1e12:.2f} TFLOP/s ({args.dtype} matmul)")
    base = tokens / statistics.median(times["transformers"])
    for name, t in times.items():
        tok_s = tokens / statistics.median(t)
        print(f"{name:>14}: {tok_s:8,.0f} tok/s  (median step {statistics.median(t) * 1e3:6.0f} ms)  "
              f"{tok_s / base:4.2f}× transformers  MFU {tok_s * fpt / peak:5.1%}")


if __name__ == "__main__":
    main()

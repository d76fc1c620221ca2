"""Serving throughput under load: aggregate generated tokens/s with N concurrent streaming clients vs 1,
and time to first token (p50/p99) under that load. Loopback only, bounded in requests and time.

Starts `kogpt serve` in a subprocess on 127.0.0.1 with random weights of a preset's shape (default
KoGPT2-base, 125M) and the KoGPT2 tokenizer from ../shared/data (else a small trained one). Each
client sends --requests streaming completions in a row (a ~20-token Korean prompt, sampling, --max-tokens
new tokens); tokens come from the final usage chunk, TTFT is the first data chunk. 1-client and N-client
phases alternate for --rounds rounds and medians are reported, so drifting load hits both alike.
With --adapters K the server also serves K random LoRA adapters (r 16 on every linear, `--lora`), and a
third phase runs the N clients spread over the adapters (client i asks for adapter i mod K): its aggregate
tokens/s against the N clients on the base is what multi-LoRA serving costs.

    python benchmarks/serve_load.py                       # fp32; 3 rounds of 1 client vs 8 clients
    python benchmarks/serve_load.py --dtype bf16 --temperature 0 --json out.json
    python benchmarks/serve_load.py --dtype bf16 --adapters 2  # + 8 clients over 2 adapters
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizer" / "kogpt2-v1"
PROMPTS = ["대한민국의 수도는 서울이며, 한강을 중심으로 발전한 도시로서 정치와 경제와 문화의 중심지이다. 서울의 역사는",
           "오늘은 날씨가 맑고 따뜻해서 친구들과 함께 한강 공원에 가서 자전거를 타고 맛있는 음식을 먹었다. 그리고",
           "한국어 자연어 처리는 교착어의 특성 때문에 형태소 분석이 중요하며, 최근에는 대규모 언어 모델이 널리",
           "이 영화는 배우들의 연기가 정말 훌륭했고 음악도 좋았지만, 이야기의 전개가 조금 느려서 아쉬웠다. 다음에는"]


def make_model(preset: str) -> Path:
    """Random weights of `preset` plus a tokenizer, cached in the temp folder."""
    from kogpt.apps.bench import make_random_checkpoint
    from kogpt.text.bpe import train_tokenizer
    from kogpt.text.tokenizer import Tokenizer

    folder = Path(tempfile.gettempdir()) / f"kogpt-serve-bench-{preset}"
    make_random_checkpoint(folder, preset)
    if not (folder / "tokenizer.json").exists():
        if SHARED_TOKENIZER.exists():
            Tokenizer.from_dir(SHARED_TOKENIZER).save(folder)
        else:
            lines = folder / "lines.txt"
            lines.write_text("\n".join(PROMPTS * 20), encoding="utf-8")
            train_tokenizer([lines], vocab_size=1000, show_progress=False).save(folder)
    return folder


def make_adapters(folder: Path, k: int, r: int = 16) -> list[Path]:
    """k random PEFT LoRA adapters for `folder` (non-zero B, as after training), cached beside it."""
    import torch

    from kogpt.core.layout import Layout
    from kogpt.core.lora import LoRAConfig, lora_layers
    from kogpt.hf.load import load
    from kogpt.hf.peft import ADAPTER_WEIGHTS, write_adapter

    out = [folder.with_name(f"{folder.name}-lora{i}") for i in range(k)]
    for i, path in enumerate(out):
        if (path / ADAPTER_WEIGHTS).exists():
            continue
        model = load(folder, Layout(torch.float32, lora=LoRAConfig(r=r, alpha=2.0 * r)))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
        write_adapter(model, path, base=str(folder))
    return out


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, temperature: float,
                      model: str | None = None) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "top_k": 50, "stream": True,
            "stream_options": {"include_usage": True}} | ({"model": model} if model else {})
    t0 = time.perf_counter()
    ttft, tokens, status = None, 0, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"status": status, "ttft": ttft, "tokens": tokens, "latency": time.perf_counter() - t0}


async def phase(url: str, clients: int, requests: int, max_tokens: int, temperature: float, deadline: float,
                models: list[str] | None = None) -> dict:
    """`clients` concurrent clients, each sending `requests` streaming requests in a row; client i asks for
    models[i mod len(models)] (None: the base)."""
    results: list[dict] = []

    async def client_loop(i: int, client: httpx.AsyncClient):
        model = models[i % len(models)] if models else None
        for j in range(requests):
            if time.monotonic() > deadline:
                return
            results.append(await one_request(client, url, PROMPTS[(i + j) % len(PROMPTS)], max_tokens, temperature,
                                             model))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "errors": sum(r["status"] != 200 for r in results), "tokens": tokens,
            "seconds": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "ttfts": [r["ttft"] for r in results if r["ttft"] is not None], "loadavg": round(os.getloadavg()[0], 2)}


def summary(phases: list[dict]) -> dict:
    """Median tokens/s over rounds and TTFT percentiles over all requests of a kind."""
    ttfts = sorted(t for ph in phases for t in ph["ttfts"])

    def pct(q: float) -> float | None:
        return round(ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))], 3) if ttfts else None

    return {"tokens_per_s": statistics.median(ph["tokens_per_s"] for ph in phases), "ttft_p50_s": pct(0.5),
            "ttft_p99_s": pct(0.99), "errors": sum(ph["errors"] for ph in phases),
            "rounds": [{k: v for k, v in ph.items() if k != "ttfts"} for ph in phases]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, dtype: str, clients: int, deadline: float,
                 loras: list[Path] = ()) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(Path(tempfile.gettempdir()) / "kogpt-serve-bench.log", "w")
    cmd = [sys.executable, "-m", "kogpt", "serve", "--model", str(folder), "--port", str(port), "--dtype", dtype,
           "--max-batch-size", str(clients), "--max-queue", str(4 * clients),
           *[f"--lora=lora{i}={path}" for i, path in enumerate(loras)]]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit(f"the server did not start; see {log.name}")
        time.sleep(0.2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="kogpt2-base-v2")
    p.add_argument("--model", type=Path, default=None, help="a model folder instead of random weights")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "int8", "int8-dynamic", "int4"])
    p.add_argument("--adapters", type=int, default=0, metavar="K",
                   help="also serve K random LoRA adapters and run the clients over them (default 0: no adapters)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2, help="requests per client and round, one after another")
    p.add_argument("--rounds", type=int, default=3, help="1-client and N-client phases alternate this many times")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: sampling, top_k 50)")
    p.add_argument("--time-limit", type=float, default=600, help="stop sending new requests after this many seconds")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    folder = args.model or make_model(args.preset)
    deadline = time.monotonic() + args.time_limit
    loras = make_adapters(folder, args.adapters)
    names = [f"lora{i}" for i in range(len(loras))]
    server, url = start_server(folder, args.dtype, args.clients, deadline, loras)
    single, multi, mixed = [], [], []
    try:
        load_before = os.getloadavg()
        asyncio.run(phase(url, 1, 1, 8, args.temperature, deadline))  # warm-up
        for _ in range(args.rounds):  # alternating, so load from other jobs hits both kinds alike
            single.append(asyncio.run(phase(url, 1, args.requests, args.max_tokens, args.temperature, deadline)))
            multi.append(asyncio.run(phase(url, args.clients, args.requests, args.max_tokens, args.temperature,
                                           deadline)))
            if names:
                mixed.append(asyncio.run(phase(url, args.clients, args.requests, args.max_tokens, args.temperature,
                                               deadline, names)))
        load_after = os.getloadavg()
    finally:
        server.terminate()
        server.wait(30)
    one, many = summary(single), summary(multi)
    adapted = summary(mixed) if mixed else None
    speedups = [m["tokens_per_s"] / s["tokens_per_s"] for s, m in zip(single, multi) if s["tokens_per_s"]]
    out = {"model": str(folder), "dtype": args.dtype, "temperature": args.temperature, "cpus": os.cpu_count(),
           "loadavg_before": load_before, "loadavg_after": load_after, "single": one, "concurrent": many,
           "speedup_median": round(statistics.median(speedups), 2) if speedups else None,
           "speedup_per_round": [round(x, 2) for x in speedups]}
    rows = [("1 client", one), (f"{args.clients} clients", many)]
    if adapted:
        ratios = [a["tokens_per_s"] / m["tokens_per_s"] for m, a in zip(multi, mixed) if m["tokens_per_s"]]
        out.update(adapters=len(names), mixed_adapters=adapted, adapters_vs_base_median=round(
            statistics.median(ratios), 2), adapters_vs_base_per_round=[round(x, 2) for x in ratios])
        rows.append((f"{args.clients} clients over {len(names)} adapters", adapted))
    for name, r in rows:
        print(f"{name:>10}: {r['tokens_per_s']} tok/s (median of {len(r['rounds'])} rounds: "
              f"{', '.join(str(x['tokens_per_s']) for x in r['rounds'])}); TTFT p50 {r['ttft_p50_s']} s, "
              f"p99 {r['ttft_p99_s']} s; {r['errors']} errors")
    print(f"aggregate speedup {out['speedup_median']}x (per round {out['speedup_per_round']}) on {out['cpus']} CPUs; "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (other jobs share this machine)")
    if adapted:
        print(f"{args.clients} clients over {len(names)} adapters vs on the base: {out['adapters_vs_base_median']}x "
              f"(per round {out['adapters_vs_base_per_round']})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if one["errors"] == 0 and many["errors"] == 0 and (adapted or {}).get("errors", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

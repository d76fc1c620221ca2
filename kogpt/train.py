"""THE training loop: pretraining now, finetuning later (a task supplies the batches, loss and metrics).

One process or a torchrun job (DDP, or FSDP2 with `fsdp`; gloo on CPU, nccl on GPU): every rank
draws the same global batch and runs its share of the grad_accum micro-batches, so the optimizer
step is the same on any world size. bf16 autocast over fp32 weights, AdamW with warmup + cosine
(optim.py), periodic validation with a short sample, a JSONL log and loss.png, atomic checkpoints
every N steps and on SIGINT/SIGTERM (train_state.py); only rank 0 writes. The final model folder
(`out/model`) is HF format with the tokenizer beside the weights.

    train(load_config("pretrain.toml", {"data": "data", "max_steps": 200}))
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint import build_model, load_config, load_model, resolve, save_model, write_json
from .config import GPTConfig
from .data import TOKENIZER_DIR, BatchSampler, DataError, read_meta
from .errors import UserError
from .loss import LMLoss
from .model import GPT
from .optim import flops_per_token, lr_at, make_optimizer, measure_peak_flops, set_lr
from .run_log import RunLog
from .train_config import TrainConfig
from .train_state import gather, load_latest, restore, rng_state, save_checkpoint

MODEL_DIR, CKPT_DIR = "model", "checkpoints"
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Env:
    """Where this process runs: torchrun's world (1 process without torchrun) and its device."""

    world: int
    rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (a no-op in one process)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t


def setup_env(device: str) -> Env:
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Env(world, rank, dev)


class LMTask:
    """Pretraining: random windows of the prepared token memmaps, next-token loss, val loss/ppl/bpb.

    A task gives the loop its module (wrap: the model plus its loss in one forward), the
    micro-batches of each step, the loss of one micro-batch, and its validation metrics.
    """

    def __init__(self, cfg: TrainConfig, meta: dict, env: Env):
        self.cfg, self.env, self.meta = cfg, env, meta
        self.train = BatchSampler.from_dir(cfg.data, "train", cfg.seq_len, cfg.seed, cfg.weights, meta)
        if meta["splits"]["val"]["tokens"] < cfg.seq_len + 1:
            raise DataError(f"the val split of {cfg.data} has {meta['splits']['val']['tokens']} tokens, fewer than "
                            f"seq_len + 1: prepare with a larger --val-fraction or train with a shorter --seq-len")
        self.val = BatchSampler.from_dir(cfg.data, "val", cfg.seq_len, seed=0, meta=meta)
        self.sources = [s["name"] for s in meta["sources"]]

    def micro_batches(self, step: int, n_micro: int) -> list[torch.Tensor]:
        """This rank's n_micro micro-batches (B, T+1) of the global batch of optimizer step `step`."""
        B = self.cfg.batch_size
        starts, _ = self.train.starts(step, B * self.cfg.grad_accum)
        mine = starts[self.env.rank * n_micro * B:(self.env.rank + 1) * n_micro * B]
        return [self.train.read(mine[i * B:(i + 1) * B]).to(self.env.device) for i in range(n_micro)]

    def wrap(self, model: GPT) -> torch.nn.Module:
        return LMLoss(model)

    @staticmethod
    def loss(net, batch: torch.Tensor) -> torch.Tensor:
        return net(batch)

    @torch.no_grad()
    def evaluate(self, net, autocast) -> dict:
        """Loss, perplexity and bits per byte on fixed val batches (shared among ranks), and loss per source."""
        n, S = self.cfg.eval_batches, len(self.sources)
        sums = torch.zeros(2, S, dtype=torch.float64, device=self.env.device)  # [loss sum, rows] per source
        for j in range(self.env.rank, math.ceil(n / self.env.world) * self.env.world, self.env.world):
            starts, src = self.val.starts(min(j, n - 1), self.cfg.batch_size)  # every rank runs as many forwards
            with autocast:
                rows = net(self.val.read(starts).to(self.env.device), reduction="none").double()
            if j < n:
                src = torch.from_numpy(src).to(self.env.device)
                sums[0].index_add_(0, src, rows)
                sums[1].index_add_(0, src, torch.ones_like(rows))
        sums = self.env.all_reduce(sums).cpu()  # nccl reduces device tensors only
        # windows are stratified by source; weigh each source's mean loss by its share of val tokens
        seen = [i for i in range(S) if sums[1, i]]
        loss_s = {i: (sums[0, i] / sums[1, i]).item() for i in seen}
        val = [self.meta["sources"][i]["val"] for i in seen]
        tokens = sum(v["tokens"] for v in val)
        loss = sum(loss_s[i] * v["tokens"] for i, v in zip(seen, val)) / tokens
        bpb = loss * tokens / math.log(2) / sum(v["bytes"] for v in val)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_bpb": bpb,
                "val_loss_by_source": {self.sources[i]: round(loss_s[i], 4) for i in seen}}


@dataclass
class TrainResult:
    step: int
    model_dir: Path | None  # the HF folder, once max_steps is reached
    signal: int | None  # SIGINT/SIGTERM that stopped training early
    metrics: dict


def _load_tokenizer(cfg: TrainConfig, meta: dict):
    from .tokenizer import Tokenizer

    tok = Tokenizer.from_dir(Path(cfg.data) / TOKENIZER_DIR)
    if tok.hash() != meta["tokenizer"]["hash"]:
        raise DataError(f"{cfg.data}/{TOKENIZER_DIR} is not the tokenizer meta.json was prepared with: prepare again")
    return tok


def _model_config(cfg: TrainConfig, tok, resumed: dict | None) -> GPTConfig:
    shape = {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "n_head") if getattr(cfg, k)}
    if resumed is not None:
        mcfg = GPTConfig(**resumed["model_config"])
        if any(getattr(mcfg, k) != v for k, v in shape.items()):
            raise UserError(f"the checkpoint's model has another shape than {shape}")
    elif cfg.init_from:
        if shape:
            raise UserError(f"{', '.join(shape)} shape a new model from a preset; --init-from keeps the model's shape")
        folder = resolve(cfg.init_from)
        mcfg = load_config(folder)
        if (folder / "tokenizer.json").exists() and type(tok).from_dir(folder).hash() != tok.hash():
            raise UserError(f"vocab mismatch: {cfg.init_from} has its own tokenizer and the data was prepared with "
                            f"another: prepare the data with --tokenizer {cfg.init_from}")
    else:
        try:
            mcfg = GPTConfig.preset(cfg.preset)
        except KeyError as e:
            raise UserError(e.args[0]) from None
        try:
            mcfg = mcfg.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                pad_token_id=tok.pad_id, **shape)
        except ValueError as e:
            raise UserError(f"model shape: {e}") from None
    if mcfg.vocab_size < tok.vocab_size:
        src = cfg.init_from or "the checkpoint"
        raise UserError(f"vocab mismatch: the model ({src}) has vocab_size {mcfg.vocab_size}, the data's tokenizer "
                        f"{tok.vocab_size}: prepare the data with the model's tokenizer")
    if cfg.seq_len > mcfg.n_positions:
        raise UserError(f"seq_len {cfg.seq_len} exceeds the model's n_positions {mcfg.n_positions}")
    return mcfg


def _check(cfg: TrainConfig, env: Env) -> None:
    for name in ("batch_size", "grad_accum", "seq_len", "max_steps", "eval_batches", "keep_last", "log_every"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.grad_accum % env.world:
        raise UserError(f"grad_accum {cfg.grad_accum} must be a multiple of the {env.world} torchrun processes")
    if cfg.dtype not in _DTYPES:
        raise UserError(f"dtype must be one of {', '.join(_DTYPES)}, got {cfg.dtype!r}")
    if not cfg.data:
        raise UserError("no data: pass --data DIR (the --out folder of `kogpt prepare`)")


@contextmanager
def _stop_on_signals():
    """Yields a dict whose 'signal' is set by SIGINT/SIGTERM, so the loop can checkpoint and stop."""
    state: dict = {"signal": None}
    handler = lambda signum, frame: state.__setitem__("signal", signum)  # noqa: E731
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _no_sync(fwd, net, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch (DDP's no_sync, FSDP2's flag)."""
    if hasattr(net, "set_requires_gradient_sync"):
        net.set_requires_gradient_sync(sync)
    return fwd.no_sync() if not sync and hasattr(fwd, "no_sync") else nullcontext()


def _wrap(model: GPT, task, cfg: TrainConfig, env: Env):
    """(net, fwd): net is the task's module (model + loss; sharded in place by FSDP2), fwd what to call."""
    net = task.wrap(model)
    if env.world > 1 and cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.h:
            fully_shard(block)
        fully_shard(net)
    fwd = torch.compile(net) if cfg.compile else net
    if env.world > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        fwd = DistributedDataParallel(fwd, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return net, fwd


def _sample(model: GPT, tok, cfg: TrainConfig, env: Env) -> str:
    from .generate import generate_ids
    from .sampling import SamplingConfig

    prompt = [tok.eos_id, *tok.encode(cfg.sample_prompt)]  # every document follows an EOS
    n = min(cfg.sample_tokens, model.config.n_positions - len(prompt))
    if n <= 0:
        return ""
    rng = torch.Generator(env.device).manual_seed(cfg.seed)
    with torch.no_grad():
        new = generate_ids(model, [prompt], max_new_tokens=n, sampling=SamplingConfig(temperature=0.8, top_k=50),
                           eos_ids=[tok.eos_id], rng=rng)[0]
    return tok.decode(prompt[1:] + new, skip_special_tokens=True)  # decoded together: the space after the prompt stays


def train_step(fwd, net, opt, task, batches: list, autocast, grad_clip: float):
    """One optimizer step over this rank's micro-batches: (mean loss tensor, grad norm or None)."""
    losses = []
    for i, batch in enumerate(batches):
        with _no_sync(fwd, net, i == len(batches) - 1), autocast:
            loss = task.loss(fwd, batch) / len(batches)
        loss.backward()
        losses.append(loss.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip) if grad_clip > 0 else None
    opt.step()
    opt.zero_grad(set_to_none=True)
    return torch.stack(losses).sum(), grad_norm


def train(cfg: TrainConfig, task=None) -> TrainResult:
    """Train as `cfg` says (resuming if cfg.resume); `task` defaults to LMTask (pretraining)."""
    env = setup_env(cfg.device)
    try:
        return _train(cfg, env, task)
    finally:
        if env.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, env: Env, task) -> TrainResult:
    _check(cfg, env)
    meta = read_meta(cfg.data)
    tok = _load_tokenizer(cfg, meta)
    out, say = Path(cfg.out), (tqdm.write if env.main else (lambda *a, **k: None))
    resumed = load_latest(out / CKPT_DIR) if cfg.resume else None
    if cfg.resume and resumed is None:
        raise UserError(f"nothing to resume: no checkpoint in {out / CKPT_DIR}")
    if resumed is not None and resumed["data_hash"] != meta["tokenizer"]["hash"]:
        raise UserError(f"the checkpoint in {out / CKPT_DIR} was trained on data of another tokenizer")
    mcfg = _model_config(cfg, tok, resumed)
    task = task or LMTask(cfg, meta, env)

    torch.manual_seed(cfg.seed)  # the same init on every rank
    if cfg.init_from and resumed is None:
        model = load_model(resolve(cfg.init_from), dtype=torch.float32, device=env.device)
    else:
        with env.device:
            model = GPT(mcfg)
    model.train()
    net, fwd = _wrap(model, task, cfg, env)
    opt = make_optimizer(net, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    step = 0
    if resumed is not None:
        restore(model, opt, resumed)
        step = resumed["step"]
        say(f"resumed from step {step}")
    min_lr = cfg.min_lr if cfg.min_lr >= 0 else cfg.lr / 10
    autocast = torch.autocast(env.device.type, dtype=_DTYPES[cfg.dtype], enabled=cfg.dtype != "float32")
    n_micro = cfg.grad_accum // env.world
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    peak = cfg.peak_flops or measure_peak_flops(_DTYPES[cfg.dtype], env.device)
    flops_step = flops_per_token(mcfg, cfg.seq_len) * tokens_per_step
    log = RunLog(out, env.main, step if resumed is not None else None)
    if env.main:
        write_json(out / "config.json", {"train": cfg.to_dict(), "model": _config_dict(mcfg),
                                         "params": mcfg.num_params(), "world_size": env.world})
        say(f"model: {mcfg.num_params() / 1e6:.2f}M parameters; {tokens_per_step} tokens per step; "
            f"{env.world} process(es) on {env.device.type}")

    def checkpoint():
        sd, osd = gather(model, opt)
        if env.main:
            state = {"step": step, "model": sd, "optimizer": osd, "rng": rng_state(), "model_config": _config_dict(mcfg),
                     "train_config": cfg.to_dict(), "data_hash": meta["tokenizer"]["hash"]}
            save_checkpoint(out / CKPT_DIR, step, state, cfg.keep_last)

    def validate():
        metrics = task.evaluate(fwd, autocast)
        metrics["sample"] = _sample(model, tok, cfg, env) if cfg.sample_tokens else ""
        log.write(step=step, **metrics)
        log.plot()
        say(f"step {step}: val loss {metrics['val_loss']:.4f}, ppl {metrics['val_ppl']:.1f}, "
            f"bpb {metrics['val_bpb']:.4f} | {metrics['sample']!r}")
        return metrics

    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not (env.main and cfg.progress), dynamic_ncols=True)
    metrics, times, t_start, signum = {}, [], time.perf_counter(), None
    with _stop_on_signals() as stop:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            set_lr(opt, lr := lr_at(step, lr=cfg.lr, min_lr=min_lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps))
            loss_sum, grad_norm = train_step(fwd, net, opt, task, task.micro_batches(step, n_micro), autocast,
                                             cfg.grad_clip)
            step += 1
            # one all-reduce: the mean loss over ranks, and whether any rank got a signal (all stop together)
            stopping = torch.tensor(float(bool(stop["signal"])), device=env.device)
            loss_val, anyone = env.all_reduce(torch.stack([loss_sum.float(), stopping])).tolist()
            loss_val /= env.world
            signum = stop["signal"] or (signal.SIGTERM if anyone else None)
            dt = time.perf_counter() - t0
            times.append(dt)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:,.0f}",
                            mfu=f"{flops_step / dt / (peak * env.world):.1%}")
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                busy = sum(times)  # training time since the last line, validation and saving excluded
                log.write(step=step, loss=loss_val, lr=lr, tok_s=tokens_per_step * len(times) / busy,
                          mfu=flops_step * len(times) / busy / (peak * env.world),
                          grad_norm=None if grad_norm is None else float(grad_norm), time=time.perf_counter() - t_start)
                times = []
            if step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0):
                metrics = validate()
            if signum or step == cfg.max_steps or (cfg.save_every and step % cfg.save_every == 0):
                checkpoint()
            if signum:
                say(f"stopped by signal {signum} at step {step}; checkpoint saved, continue with --resume")
                break
    bar.close()
    model_dir = None
    if step == cfg.max_steps:
        model_dir = _export(model, mcfg, tok, out / MODEL_DIR, env)
        say(f"model saved to {model_dir}")
    return TrainResult(step, model_dir, signum if step < cfg.max_steps else None, metrics)


def _config_dict(mcfg: GPTConfig) -> dict:
    d = asdict(mcfg)
    d.pop("extra")
    return d


def _export(model: GPT, mcfg: GPTConfig, tok, folder: Path, env: Env) -> Path:
    """The HF-format model folder (config.json, model.safetensors) plus the tokenizer files."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.main:
        save_model(build_model(mcfg, sd), folder)
        tok.save(folder)
    return folder

"""THE training loop, for pretraining (pretrain.LMObjective) and finetuning (finetune.ClassifierObjective).

An Objective (what a run optimizes) supplies the model, each step's micro-batches, the loss, the
validation metrics and the HF folder; the loop owns the rest: DDP/FSDP2 under torchrun (every rank
draws the same global batch and runs its share of grad_accum), bf16 autocast, AdamW with warmup +
cosine, validation, log.jsonl and loss.png, atomic checkpoints (every N steps, on SIGINT/SIGTERM)
with exact resume, rank-0-only writes.
`out/model` is written at the end, or at each new best validation score when the objective selects one.
An --out that holds an earlier run is refused unless --resume (continue it) or --overwrite (delete it).

    train(read_train_config("pretrain.toml", {"data": "data", "max_steps": 200}))
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..core.config import GPTConfig
from ..core.dtypes import torch_dtype
from ..data.tokens import read_meta
from ..errors import UserError
from ..fileio import write_json
from ..core.model import GPT, Block
from .optim import flops_per_token, lr_at, make_optimizer, measure_peak_flops, set_lr
from .pretrain import LMObjective
from .run_log import LOG_FILE, PLOT_FILE, RunLog
from .config import TrainConfig, check_config
from .state import checkpoints, gather, load_latest, restore, rng_state, save_checkpoint

__all__ = ["Env", "Objective", "TrainResult", "check_run_folder", "setup_env", "train", "train_step"]

MODEL_DIR, CKPT_DIR = "model", "checkpoints"


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


class Objective(Protocol):
    """What a run optimizes, as the loop asks of it: LMObjective (pretrain.py), ClassifierObjective (finetune.py)."""

    data_hash: str  # what a checkpoint must have been trained on to be resumed
    select: tuple[str, str] | None  # (metric, "max"/"min"): export the model at each new best; None: at the end

    def start(self, cfg: TrainConfig, env: Env, resumed: dict | None) -> torch.nn.Module: ...  # the model
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module: ...  # model (+ loss) for DDP/FSDP/compile
    def micro_batches(self, step: int, n_micro: int) -> list: ...  # this rank's share of step's global batch
    def loss(self, net, batch) -> torch.Tensor: ...  # mean loss of one micro-batch
    def tokens(self, step: int) -> int: ...  # tokens of step's global batch (throughput, MFU)
    def evaluate(self, net, autocast) -> dict: ...  # validation metrics, the same on every rank
    def summary(self, step: int, metrics: dict) -> str: ...  # one line for the console
    def describe(self) -> dict: ...  # joins the run's config.json
    def save(self, state_dict: dict, folder: Path, step: int, metrics: dict) -> None: ...  # rank 0: the HF folder


@dataclass
class TrainResult:
    step: int
    model_dir: Path | None  # the HF folder, once max_steps is reached
    signal: int | None  # SIGINT/SIGTERM that stopped training early
    metrics: dict


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """A fresh run never writes over an earlier one: refuse an --out holding checkpoints or a model
    unless --resume (continue it) or --overwrite (delete it) says what to do with it."""
    if resume and overwrite:
        raise UserError("give --resume (continue the run in --out) or --overwrite (start it over), not both")
    if resume or overwrite:
        return
    found = []
    if n := len(checkpoints(out / CKPT_DIR)):
        found.append(f"{n} checkpoint(s)")
    if (out / MODEL_DIR).exists():
        found.append(f"{MODEL_DIR}/")
    if found:
        raise UserError(f"{out} holds an earlier run ({' and '.join(found)}): continue it with --resume, start over "
                        f"with --overwrite (deletes its checkpoints, model and log), or pick another --out")


def _clear_run(out: Path) -> None:
    """--overwrite: delete the earlier run's checkpoints, model and log (rank 0, once the new run is ready)."""
    for folder in (out / CKPT_DIR, out / MODEL_DIR):
        if folder.is_dir():
            shutil.rmtree(folder)
    for name in (LOG_FILE, PLOT_FILE):
        (out / name).unlink(missing_ok=True)


def _check(cfg: TrainConfig, env: Env) -> None:
    if cfg.grad_accum % env.world:
        raise UserError(f"grad_accum {cfg.grad_accum} must be a multiple of the {env.world} torchrun processes")


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


def _wrap(model: torch.nn.Module, objective: Objective, cfg: TrainConfig, env: Env):
    """(net, fwd): net is the objective's module (model + loss; sharded in place by FSDP2), fwd what to call."""
    net = objective.wrap(model)
    if env.world > 1 and cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in [m for m in model.modules() if isinstance(m, Block)]:
            fully_shard(block)
        fully_shard(net)
    fwd = torch.compile(net) if cfg.compile else net
    if env.world > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        fwd = DistributedDataParallel(fwd, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return net, fwd


def train_step(fwd, net, opt, objective: Objective, batches: list, autocast, grad_clip: float):
    """One optimizer step over this rank's micro-batches: (mean loss tensor, grad norm or None)."""
    losses = []
    for i, batch in enumerate(batches):
        with _no_sync(fwd, net, i == len(batches) - 1), autocast:
            loss = objective.loss(fwd, batch) / len(batches)
        loss.backward()
        losses.append(loss.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip) if grad_clip > 0 else None
    opt.step()
    opt.zero_grad(set_to_none=True)
    return torch.stack(losses).sum(), grad_norm


def train(cfg: TrainConfig, objective: Objective | None = None) -> TrainResult:
    """Train as `cfg` says (resuming if cfg.resume); `objective` defaults to LMObjective (pretraining on cfg.data)."""
    check_config(cfg)
    check_run_folder(Path(cfg.out), cfg.resume, cfg.overwrite)
    env = setup_env(cfg.device)
    try:
        return _train(cfg, env, objective)
    finally:
        if env.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _improves(value: float, best: dict | None, mode: str) -> bool:
    if best is None or math.isnan(best["value"]):
        return best is None or not math.isnan(value)
    return value > best["value"] if mode == "max" else value < best["value"]


def _train(cfg: TrainConfig, env: Env, objective: Objective | None) -> TrainResult:
    _check(cfg, env)
    if objective is None:
        if not cfg.data:
            raise UserError("no data: pass --data DIR (the --out folder of `kogpt prepare`)")
        objective = LMObjective(cfg, read_meta(cfg.data), env)
    out, say = Path(cfg.out), (tqdm.write if env.main else (lambda *a, **k: None))
    resumed = load_latest(out / CKPT_DIR) if cfg.resume else None
    if cfg.resume and resumed is None:
        raise UserError(f"nothing to resume: no checkpoint in {out / CKPT_DIR}")
    if resumed is not None and resumed["data_hash"] != objective.data_hash:
        raise UserError(f"the checkpoint in {out / CKPT_DIR} was trained on other data (another tokenizer, "
                        f"task or training file): train into a new --out")
    if resumed is not None and resumed["step"] >= cfg.max_steps:
        done = _finished(resumed["step"], cfg, objective, out)
        if done is not None:
            say(f"nothing to train: the run in {out} already reached step {cfg.max_steps} (max_steps); "
                f"its model is in {done}")
            return TrainResult(resumed["step"], done, None, {})
        say(f"the run in {out} already reached step {cfg.max_steps} (max_steps); writing its model from the checkpoint")

    torch.manual_seed(cfg.seed)  # the same init on every rank
    model = objective.start(cfg, env, resumed)
    for gpt in (m for m in model.modules() if isinstance(m, GPT)):
        gpt.grad_checkpoint = cfg.grad_checkpoint
    mcfg = model.config
    model.train()
    net, fwd = _wrap(model, objective, cfg, env)
    opt = make_optimizer(net, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    step, best = 0, None  # best: {"step", "metric", "value"} of the objective's selection metric
    if resumed is not None:
        restore(model, opt, resumed)
        step, best = resumed["step"], resumed.get("best")
        say(f"resumed from step {step}")
    min_lr = cfg.min_lr if cfg.min_lr >= 0 else cfg.lr / 10
    autocast = torch.autocast(env.device.type, dtype=torch_dtype(cfg.dtype), enabled=cfg.dtype != "float32")
    n_micro = cfg.grad_accum // env.world
    peak = cfg.peak_flops or measure_peak_flops(torch_dtype(cfg.dtype), env.device)
    flops_token = flops_per_token(mcfg, cfg.seq_len)
    if cfg.overwrite and env.main:
        _clear_run(out)
    log = RunLog(out, env.main, step if resumed is not None else None)
    if env.main:
        write_json(out / "config.json", {"train": cfg.to_dict(), "model": _config_dict(mcfg),
                                         "params": mcfg.num_params(), "world_size": env.world, **objective.describe()})
        say(f"model: {mcfg.num_params() / 1e6:.2f}M parameters; {objective.tokens(0)} tokens in the first step; "
            f"{env.world} process(es) on {env.device.type}")

    def checkpoint():
        sd, osd = gather(model, opt)
        if env.main:
            state = {"step": step, "model": sd, "optimizer": osd, "rng": rng_state(), "best": best,
                     "model_config": _config_dict(mcfg), "train_config": cfg.to_dict(),
                     "data_hash": objective.data_hash}
            save_checkpoint(out / CKPT_DIR, step, state, cfg.keep_last)

    def validate():
        nonlocal best
        metrics = objective.evaluate(fwd, autocast)
        if objective.select:
            key, mode = objective.select
            if _improves(metrics[key], best, mode):
                best = {"step": step, "metric": key, "value": metrics[key]}
                _export(model, objective, out / MODEL_DIR, env, step, metrics)
            metrics["best_step"] = best["step"]
        log.write(step=step, **metrics)
        log.plot()
        say(objective.summary(step, metrics))
        return metrics

    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not (env.main and cfg.progress), dynamic_ncols=True)
    metrics, times, tokens, t_start, signum = {}, [], 0, time.perf_counter(), None
    with _stop_on_signals() as stop:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            set_lr(opt, lr := lr_at(step, lr=cfg.lr, min_lr=min_lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps))
            batches = objective.micro_batches(step, n_micro)
            loss_sum, grad_norm = train_step(fwd, net, opt, objective, batches, autocast, cfg.grad_clip)
            n_tok = objective.tokens(step)
            step += 1
            # one all-reduce: the mean loss over ranks, and whether any rank got a signal (all stop together)
            stopping = torch.tensor(float(bool(stop["signal"])), device=env.device)
            loss_val, anyone = env.all_reduce(torch.stack([loss_sum.float(), stopping])).tolist()
            loss_val /= env.world
            signum = stop["signal"] or (signal.SIGTERM if anyone else None)
            dt = time.perf_counter() - t0
            times.append(dt)
            tokens += n_tok
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", tok_s=f"{n_tok / dt:,.0f}",
                            mfu=f"{flops_token * n_tok / dt / (peak * env.world):.1%}")
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                busy = sum(times)  # training time since the last line, validation and saving excluded
                log.write(step=step, loss=loss_val, lr=lr, tok_s=tokens / busy,
                          mfu=flops_token * tokens / busy / (peak * env.world),
                          grad_norm=None if grad_norm is None else float(grad_norm), time=time.perf_counter() - t_start)
                times, tokens = [], 0
            if step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0):
                metrics = validate()
            if signum or step == cfg.max_steps or (cfg.save_every and step % cfg.save_every == 0):
                checkpoint()
            if signum:
                say(f"stopped by signal {signum} at step {step}; checkpoint saved, continue with --resume")
                break
    bar.close()
    model_dir = None
    if step == cfg.max_steps and not objective.select:
        model_dir = _export(model, objective, out / MODEL_DIR, env, step, metrics)
        say(f"model saved to {model_dir}")
    elif step == cfg.max_steps and (out / MODEL_DIR).is_dir():  # written at the best validation
        model_dir = out / MODEL_DIR
        say(f"model saved to {model_dir}: step {best['step']}, best {best['metric']} {best['value']:.4f}")
    elif step == cfg.max_steps:
        say(f"{out / MODEL_DIR} is missing: it was written at step {best['step']} (the best validation), then removed")
    return TrainResult(step, model_dir, signum if step < cfg.max_steps else None, metrics)


def _finished(step: int, cfg: TrainConfig, objective: Objective, out: Path) -> Path | None:
    """A resumed run whose checkpoint is at max_steps: its model folder, or None when the objective can
    write it again from the checkpoint (written at the end); past max_steps, or a lost best model, is an error."""
    if step > cfg.max_steps:
        raise UserError(f"the checkpoint in {out / CKPT_DIR} is at step {step}, past max_steps {cfg.max_steps}: "
                        f"resume with the run's own settings (max_steps >= {step}), or train into a new --out")
    if (out / MODEL_DIR).is_dir():
        return out / MODEL_DIR
    if objective.select:
        raise UserError(f"the run in {out} is complete, but its best model {out / MODEL_DIR} is missing and cannot "
                        f"be rebuilt from the last checkpoint: train again into a new --out (or with --overwrite)")
    return None


def _config_dict(mcfg: GPTConfig) -> dict:
    d = asdict(mcfg)
    d.pop("extra")
    return d


def _export(model: torch.nn.Module, objective: Objective, folder: Path, env: Env, step: int, metrics: dict) -> Path:
    """The objective's HF-format folder from the full (gathered) state dict; only rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.main:
        _replace_folder(folder, lambda tmp: objective.save(sd, tmp, step, metrics))
    return folder


def _replace_folder(folder: Path, write) -> None:
    """write(tmp) into a new sibling folder, then put it in place of `folder`: a kill mid-write leaves the
    previous folder whole (and at worst a stray temp folder)."""
    for stale in folder.parent.glob(f".{folder.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.new.", suffix=".tmp", dir=folder.parent))
    old = tmp.with_name(tmp.name.replace(".new.", ".old."))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder the usual permissions
        write(tmp)
        if folder.exists():
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except BaseException:
            if old.exists():
                os.replace(old, folder)  # put the previous folder back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)

"""TrainConfig: every setting of the training loop — `kogpt train`'s, and the loop's part of `kogpt finetune`'s.

Each field documents itself once (its `help` metadata); the CLI builds one `--flag` per field from
it. Precedence: defaults < TOML file < flags. A TOML key that is not a field is an error naming the
key and the closest field, so a typo never silently trains with a default. check_config() is the one
check of every value, the device and --out, before any work; finetuning runs it on its TrainConfig too.
ScheduledConfig: the settings finetune and sft share (model, files, a schedule in epochs) around their loop's.

    cfg = read_train_config("pretrain.toml", {"max_steps": 100})
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from ..core.dtypes import TRAIN
from ..errors import UserError
from ..fileio import check_output_dir


def option(default, help: str, **kw):
    """A settings field that carries its --help text; kw: its metavar, and the flag of a dict (--weight)."""
    return field(default=default, metadata={"help": help, **kw})


def redefault(base, name: str, default):
    """Field `name` of dataclass `base` with another default and the same help, for a subclass to redeclare."""
    (f,) = (f for f in dataclasses.fields(base) if f.name == name)
    return field(default=default, metadata=f.metadata)


def flag_name(name: str) -> str:
    """The flag of a setting: weight_decay is --weight-decay."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """The training loop's settings, one field each (its help is the flag's --help text)."""

    # what to train on and where to write
    data: str = option("", "prepared data folder (from `kogpt prepare --out`)", metavar="DIR")
    out: str = option("runs/kogpt", "run folder: log.jsonl, loss.png, checkpoints/ and the final model/", metavar="DIR")
    preset: str = option("tiny", "model shape from a named preset (its vocab_size follows the data's tokenizer)")
    init_from: str = option("", "start from an HF-format model folder instead of a preset (continued pretraining)",
                            metavar="MODEL")
    n_layer: int = option(0, "layers, overriding the preset's (0 keeps it)")
    n_embd: int = option(0, "width, overriding the preset's (0 keeps it)")
    n_head: int = option(0, "attention heads, overriding the preset's (0 keeps it)")
    resume: bool = option(False, "continue from the latest checkpoint in --out (model, optimizer, data position); a "
                                  "run already at max_steps trains nothing and exits 0 once its model folder is there")
    overwrite: bool = option(False, "start afresh in an --out that holds an earlier run, deleting its checkpoints, "
                                     "model and log (without it, such an --out is refused)")
    # batch: a step sees batch_size * grad_accum sequences of seq_len tokens, on any number of processes
    batch_size: int = option(8, "sequences per micro-batch per process")
    grad_accum: int = option(1, "micro-batches per optimizer step in total (divided among torchrun processes)")
    seq_len: int = option(256, "tokens per sequence (at most the model's n_positions)")
    max_steps: int = option(1000, "optimizer steps to train for")
    # optimizer and schedule
    lr: float = option(6e-4, "peak learning rate (AdamW)")
    min_lr: float = option(-1.0, "learning rate at the end of the cosine decay; negative means lr / 10")
    warmup_steps: int = option(100, "linear warmup steps before the cosine decay")
    weight_decay: float = option(0.1, "AdamW weight decay of matmul weights and embeddings (not biases, LayerNorms)")
    dropout: float = option(0.0, "share of embeddings, attention weights and residual branches dropped while training")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0 disables")
    weights: dict = option(None, "mixing weight per source, overriding prepare's (TOML table; flag NAME=W)",
                           flag="--weight", metavar="NAME=W")
    # LoRA: adapters on a frozen bf16 base instead of training every weight
    lora_r: int = option(0, "LoRA rank: train low-rank adapters on the frozen base model (held in bf16) and write "
                            "a PEFT adapter folder instead of a model; 0: train every weight")
    lora_alpha: float = option(16.0, "LoRA alpha: the adapters' update is scaled by alpha / r")
    lora_dropout: float = option(0.0, "share of the adapters' inputs dropped while training")
    lora_targets: str = option("", "linears that get adapters: attn, mlp, or names (qkv, proj, fc, attn.proj, ...; "
                                   "q, k, v for GPT-J); default: every attention and MLP projection")
    # validation, logging, checkpoints
    eval_every: int = option(200, "validate (loss, perplexity, bits per byte, a sample) every N steps; 0: at the end "
                                  "only")
    eval_batches: int = option(20, "validation batches of batch_size sequences")
    sample_prompt: str = option("대한민국은", "prompt of the sample generated at each validation")
    sample_tokens: int = option(32, "tokens of the sample generated at each validation; 0 disables")
    log_every: int = option(10, "write a log.jsonl line every N steps")
    save_every: int = option(500, "write a checkpoint every N steps (and on SIGINT/SIGTERM); 0: at the end only")
    keep_last: int = option(3, "checkpoints to keep")
    # runtime
    seed: int = option(1337, "seed of the model init and the data order")
    dtype: str = option("bfloat16", "autocast dtype of matmuls: bfloat16 or float32 (weights stay float32)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    compile: bool = option(False, "torch.compile the model (slow first step, faster after)")
    grad_checkpoint: bool = option(False, "gradient checkpointing: keep only each block's input and recompute its "
                                          "activations in backward (less memory for about a third more compute)")
    fsdp: bool = option(False, "under torchrun, shard parameters, gradients and optimizer state (FSDP2) instead of DDP")
    peak_flops: float = option(0.0, "peak FLOP/s of one process for MFU; 0 measures a matmul once at start")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        self.weights = dict(self.weights or {})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# a range: (test, the range in words as the error says it); a float must be finite as well
COUNT = (lambda x: x >= 1, ">= 1")
NON_NEGATIVE = (lambda x: x >= 0, ">= 0")
FRACTION = (lambda x: 0 <= x < 1, "in [0, 1)")
RANGES = {
    **dict.fromkeys(("batch_size", "grad_accum", "seq_len", "max_steps", "eval_batches", "keep_last", "log_every"),
                    COUNT),
    **dict.fromkeys(("n_layer", "n_embd", "n_head", "warmup_steps", "eval_every", "save_every", "sample_tokens",
                     "weight_decay", "grad_clip", "peak_flops", "lora_r"), NON_NEGATIVE),
    **dict.fromkeys(("dropout", "beta1", "beta2", "lora_dropout"), FRACTION),
    "lora_alpha": (lambda x: x > 0, "> 0"),
    "lr": (lambda x: x > 0, "> 0"), "min_lr": (lambda x: True, "a number (< 0: lr / 10)"),
    "seed": (lambda x: 0 <= x < 1 << 64, "in [0, 2**64)"),
}


@dataclass
class ScheduledConfig:
    """A run scheduled in epochs over a training file (FinetuneConfig, SFTConfig): the model, the files and the
    schedule in the run's terms; the training loop's own settings in `loop`, from which scheduled() makes the
    loop's. A command's subclass declares train, epochs and loop (its file format, its recipe), adds its own
    settings, and redeclares a setting here whose help or default is its own."""

    # each command's own: what its training file holds, what an epoch is, the loop's recipe
    train: str
    epochs: float
    loop: TrainConfig
    # what to tune, on what
    model: str = option("", "model folder (HF format), bundled model name or hub id: a language model",
                        metavar="MODEL")
    revision: str = option("", "hub revision of --model")
    val: str = option("", "validation file of the same format (default: --val-fraction of --train)", metavar="PATH")
    val_fraction: float = option(0.1, "share of --train held out for validation when --val is not given (seeded)")
    limit: int = option(0, "use only the first N rows of each file (0: all)")
    # the schedule and validation, in the run's terms
    max_steps: int = option(0, "optimizer steps, overriding --epochs (0: from --epochs)")
    warmup: float = option(0.1, "share of the steps spent warming the learning rate up")
    dropout: float = option(-1.0, "share of embeddings, attention weights and residual branches dropped while "
                                  "training; negative: the model's config.json")
    eval_every: int = option(0, "validate every N steps (0: ten times over the run)")
    save_every: int = option(0, "write a checkpoint every N steps (0: at each validation)")

    @classmethod
    def own_fields(cls) -> dict[str, dataclasses.Field]:
        """Its settings by name, the loop's aside: the command's own flags."""
        return {f.name: f for f in dataclasses.fields(cls) if f.name != "loop"}

    @classmethod
    def from_settings(cls, **settings) -> Self:
        """From flat settings, as the command takes them: each a field of `cls` or of its loop (the loop's
        settings start from the command's recipe, the default `loop`)."""
        own = {k: settings.pop(k) for k in list(settings) if k in cls.own_fields()}
        return cls(**own, loop=dataclasses.replace(cls().loop, **settings))


SCHEDULED_RANGES = {**dict.fromkeys(("limit", "max_steps", "eval_every", "save_every"), NON_NEGATIVE),
                    "warmup": FRACTION, "val_fraction": (lambda x: 0 < x < 1, "in (0, 1)"),
                    "dropout": (lambda x: x < 1, "in [0, 1) (negative: the model's own)")}


def _check_type(name: str, value, where: str):
    want = FIELDS[name].type
    ok = {"bool": isinstance(value, bool), "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool), "str": isinstance(value, str),
          "dict": isinstance(value, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value.values())}[want]
    if not ok:
        raise UserError(f"{where}: {name} must be a {want}, got {value!r}")
    return float(value) if want == "float" else value


def read_train_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """TrainConfig from defaults, then the TOML file (flat keys, `[weights]` table), then overrides."""
    values: dict = {}
    if path:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise UserError(f"cannot read config {path} ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); TOML files are UTF-8") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path} is not valid TOML ({e})") from None
        for key, value in raw.items():
            if key not in FIELDS:
                close = difflib.get_close_matches(key, FIELDS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(FIELDS)}"
                raise UserError(f"{path}: unknown key {key!r}{hint}")
            values[key] = _check_type(key, value, str(path))
    for key, value in (overrides or {}).items():
        values[key] = _check_type(key, value, "flag")
    return TrainConfig(**values)


def check_device(device: str) -> None:
    """UserError unless `device` is auto, cpu, cuda or cuda:N and that device exists."""
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if device in ("auto", "cpu"):
        return
    if m is None:
        raise UserError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")
    import torch  # only here: --help and the TOML checks stay torch-free

    if not torch.cuda.is_available():
        raise UserError(f"device {device} was asked for, but no CUDA device is available (use cpu)")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise UserError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0")


def check_ranges(settings, ranges: dict, flags: bool = False) -> None:
    """UserError naming the first setting outside its range (`ranges`: name -> (test, range in words)),
    as its TOML key (weight_decay) or, with `flags`, as its flag (--weight-decay)."""
    spell = flag_name if flags else str
    for name, (ok, rule) in ranges.items():
        v = getattr(settings, name)
        if (isinstance(v, float) and not math.isfinite(v)) or not ok(v):
            raise UserError(f"{spell(name)} must be {rule}, got {v}")


def check_config(cfg: TrainConfig, flags: bool = False) -> None:
    """Every setting in range, the device usable and --out a folder: a UserError before any work.
    `flags` names a bad setting as its flag, for a command without a TOML file (kogpt finetune)."""
    check_ranges(cfg, RANGES, flags)
    for name, w in cfg.weights.items():
        if not (math.isfinite(w) and w >= 0):
            raise UserError(f"the weight of source {name!r} must be a finite number >= 0, got {w}")
    if cfg.dtype not in TRAIN:
        raise UserError(f"{flag_name('dtype') if flags else 'dtype'} must be one of {', '.join(TRAIN)}, got "
                        f"{cfg.dtype!r}")
    if cfg.lora_r:
        from ..core.lora import LoRAConfig

        LoRAConfig.parse(cfg.lora_targets)  # a bad --lora-targets fails before any work
        if cfg.fsdp:
            raise UserError("--lora-r trains with DDP, not --fsdp (the frozen base is small enough to hold on every rank)")
    check_device(cfg.device)
    check_output_dir(cfg.out, "--out")


def check_scheduled(run: ScheduledConfig, required: tuple[str, ...], ranges: dict | None = None) -> None:
    """Every setting of a run scheduled in epochs and of its loop, as flags: the `required` ones and --out
    given, --model given, not both --val and --val-fraction, each in its range (SCHEDULED_RANGES and the
    command's own `ranges`), epochs > 0."""
    for name in required:
        if not getattr(run, name):
            raise UserError(f"--{name} is required")
    if not run.loop.out:
        raise UserError("--out is required")
    if not run.model:
        raise UserError("no model given: pass --model with a model folder or a Hugging Face hub id")
    if run.val and run.val_fraction != type(run).val_fraction:
        raise UserError("give --val or --val-fraction, not both")
    check_ranges(run, {**SCHEDULED_RANGES, **(ranges or {})}, flags=True)
    if not run.max_steps and not (math.isfinite(run.epochs) and run.epochs > 0):
        raise UserError(f"--epochs must be > 0, got {run.epochs}")
    check_config(run.loop, flags=True)


def scheduled(loop: TrainConfig, run: ScheduledConfig, rows: int, init_from: str, dropout: float) -> TrainConfig:
    """The loop settings of a run scheduled in epochs over `rows` examples: steps from the epochs unless
    max_steps is given, warmup as a share of them, ten validations unless eval_every is given, a checkpoint
    at each."""
    steps = run.max_steps or math.ceil(run.epochs * rows / (loop.batch_size * loop.grad_accum))
    eval_every = run.eval_every or math.ceil(steps / 10)
    return dataclasses.replace(loop, init_from=init_from, max_steps=steps, warmup_steps=round(run.warmup * steps),
                               dropout=dropout, eval_every=eval_every,
                               save_every=run.save_every or eval_every)

"""TrainConfig: every setting of `kogpt train`, read from a TOML file and overridden by flags.

Each field documents itself once (its `help` metadata); the CLI builds one `--flag` per field from
it. Precedence: defaults < TOML file < flags. A TOML key that is not a field is an error naming the
key and the closest field, so a typo never silently trains with a default.

    cfg = load_config("pretrain.toml", {"max_steps": 100})
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train on and where to write
    data: str = _f("", "prepared data folder (from `kogpt prepare --out`)")
    out: str = _f("runs/kogpt", "run folder: log.jsonl, loss.png, checkpoints/ and the final model/")
    preset: str = _f("tiny", "model shape from a named preset (its vocab_size follows the data's tokenizer)")
    init_from: str = _f("", "start from an HF-format model folder instead of a preset (continued pretraining)")
    n_layer: int = _f(0, "layers, overriding the preset's (0 keeps it)")
    n_embd: int = _f(0, "width, overriding the preset's (0 keeps it)")
    n_head: int = _f(0, "attention heads, overriding the preset's (0 keeps it)")
    resume: bool = _f(False, "continue from the latest checkpoint in --out (model, optimizer, data position)")
    # batch: a step sees batch_size * grad_accum sequences of seq_len tokens, on any number of processes
    batch_size: int = _f(8, "sequences per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches per optimizer step in total (divided among torchrun processes)")
    seq_len: int = _f(256, "tokens per sequence (at most the model's n_positions)")
    max_steps: int = _f(1000, "optimizer steps to train for")
    # optimizer and schedule
    lr: float = _f(6e-4, "peak learning rate (AdamW)")
    min_lr: float = _f(-1.0, "learning rate at the end of the cosine decay; negative means lr / 10")
    warmup_steps: int = _f(100, "linear warmup steps before the cosine decay")
    weight_decay: float = _f(0.1, "AdamW weight decay of matmul weights and embeddings (not biases, LayerNorms)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 disables")
    weights: dict = _f(None, "mixing weight per source, overriding prepare's (TOML table; flag NAME=W)",
                       metavar="NAME=W")
    # validation, logging, checkpoints
    eval_every: int = _f(200, "validate (loss, perplexity, bits per byte, a sample) every N steps; 0: at the end only")
    eval_batches: int = _f(20, "validation batches of batch_size sequences")
    sample_prompt: str = _f("대한민국은", "prompt of the sample generated at each validation")
    sample_tokens: int = _f(32, "tokens of the sample generated at each validation; 0 disables")
    log_every: int = _f(10, "write a log.jsonl line every N steps")
    save_every: int = _f(500, "write a checkpoint every N steps (and on SIGINT/SIGTERM); 0: at the end only")
    keep_last: int = _f(3, "checkpoints to keep")
    # runtime
    seed: int = _f(1337, "seed of the model init and the data order")
    dtype: str = _f("bfloat16", "autocast dtype of matmuls: bfloat16 or float32 (weights stay float32)")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    compile: bool = _f(False, "torch.compile the model (slow first step, faster after)")
    fsdp: bool = _f(False, "under torchrun, shard parameters, gradients and optimizer state (FSDP2) instead of DDP")
    peak_flops: float = _f(0.0, "peak FLOP/s of one process for MFU; 0 measures a matmul once at start")
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self):
        self.weights = dict(self.weights or {})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# the field that opens each section of `kogpt train --help`
SECTIONS = {"data": "data, model and run folder",
            "batch_size": "batch: a step sees batch_size × grad_accum sequences of seq_len tokens, on any number "
                          "of processes",
            "lr": "optimizer and schedule", "eval_every": "validation, logging and checkpoints", "seed": "runtime"}


def _check_type(name: str, value, where: str):
    want = FIELDS[name].type
    ok = {"bool": isinstance(value, bool), "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool), "str": isinstance(value, str),
          "dict": isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values())}[want]
    if not ok:
        raise UserError(f"{where}: {name} must be a {want}, got {value!r}")
    return float(value) if want == "float" else value


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """TrainConfig from defaults, then the TOML file (flat keys, `[weights]` table), then overrides."""
    values: dict = {}
    if path:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise UserError(f"cannot read config {path} ({e.strerror})") from None
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

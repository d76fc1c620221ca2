"""Instruction (chat) tuning of a GPT on conversations, on THE training loop.

SFTObjective plugs into the training loop (loop.py): conversations (data/chats.py) rendered with the
chat template `kogpt serve` prompts with (text/chat.py), length-bucketed into right-padded batches,
and the next-token loss of pretraining (loss.py) on the tokens the model writes only: the assistant
replies and the EOS after the last; system and user turns and the padding are labels -100. A step's
loss is the mean over its assistant tokens, however they fall into micro-batches and processes.
Validation is the answer loss (mean NLL of the assistant tokens of the validation split); its best
picks the exported HF folder (with the tokenizer and generation config). SFTConfig (a ScheduledConfig)
holds the loop's TrainConfig.

    sft(SFTConfig.from_settings(model="kogpt-mini", train="chat.jsonl", out="runs/sft"))
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.config import GPTConfig
from ..core.dtypes import torch_dtype
from ..core.layout import Layout
from ..core.model import GPT
from ..data.chats import Conversation, read_conversations
from ..data.corpus import DataError
from ..errors import UserError
from ..evaluation.classify import pad_id_for, pad_rows
from ..hf.folder import CheckpointError, load_config, load_dropout, require_language_model
from ..hf.hub import resolve
from ..hf.load import load
from ..hf.peft import write_adapter
from ..hf.save import write_model
from ..text.chat import ChatTemplate
from .config import ScheduledConfig, TrainConfig, check_scheduled, option, redefault, scheduled
from .loop import TrainResult, check_run_folder, train
from .lora import load_lora_base
from .loss import linear_cross_entropy

IGNORE = -100  # the label of a token the model does not write (transformers' ignore_index)
SPLIT_SEED = 0  # the validation split is the same whatever --seed is, so runs compare on the same conversations
BUCKET = 64  # a bucket of BUCKET global batches is sorted by length, so a batch holds conversations of alike length

# the loop's settings instruction tuning starts from: full finetuning with a small learning rate decayed to 0,
# AdamW betas (0.9, 0.999), a chat question as the sample at each validation, --out required
RECIPE = dict(out="", batch_size=8, grad_accum=2, seq_len=512, lr=5e-5, min_lr=0.0, weight_decay=0.0, beta2=0.999,
              keep_last=2, sample_prompt="주말에 뭐 하면 좋을까?", sample_tokens=32)
# what a loop setting means here, where its TrainConfig help (pretraining's) would mislead
LOOP_HELP = {"out": "run folder: log.jsonl, loss.png, checkpoints/ and model/ (the best model, HF format)",
             "seq_len": "tokens per conversation at most (at most the model's n_positions); a longer one is a bad row",
             "lr": "peak learning rate (AdamW), decayed by cosine to --min-lr",
             "sample_prompt": "user message answered (greedily) at each validation",
             "sample_tokens": "tokens of the answer generated at each validation; 0 disables"}


@dataclass
class SFTConfig(ScheduledConfig):
    """What to tune on which conversations, and the schedule in epochs; the training loop's own settings in
    `loop`. sft() sets the loop's init_from, max_steps, warmup_steps, dropout, eval_every and save_every."""

    train: str = option("", "conversations: JSONL ({\"messages\": [...]} or {\"prompt\", \"completion\"} rows) or a "
                            "Q,A CSV", metavar="PATH")
    epochs: float = option(2.0, "passes over the training conversations")
    loop: TrainConfig = field(default_factory=lambda: TrainConfig(**RECIPE))
    # sft's own
    chat_template: str = option("", "JSON file replacing fields of the default chat template (give `kogpt serve` "
                                    "the same file)", metavar="FILE")
    skip_bad_rows: bool = option(False, "leave out rows that are no conversation, or longer than --seq-len, and "
                                        "report their count (without it the first one is an error)")
    # shared settings, as sft words them or with its defaults
    val: str = option("", "validation conversations of the same formats (default: --val-fraction of --train)",
                      metavar="PATH")
    val_fraction: float = redefault(ScheduledConfig, "val_fraction", 0.05)
    warmup: float = redefault(ScheduledConfig, "warmup", 0.05)


FIELDS = SFTConfig.own_fields()


@dataclass
class Example:
    where: str  # file:line
    ids: list[int]
    mask: list[bool]  # per id: the model writes it (trained)


class AnswerLoss(nn.Module):
    """model + the next-token loss of the tokens labelled (labels -100 elsewhere), through pretraining's fused
    lm_head + cross-entropy (loss.py), which sees the labelled rows only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """ids, labels (B, T) as transformers takes them (shifted here) → the mean loss of the labelled
        tokens, or with reduction 'sum' their summed loss."""
        h = self.model.hidden(ids[:, :-1]).flatten(0, 1)  # (B·(T-1), C)
        y = labels[:, 1:].flatten()  # (B·(T-1),)
        keep = y != IGNORE
        if reduction == "sum":
            return linear_cross_entropy(h[keep], self.model.lm_head, y[keep], "none").sum()
        return linear_cross_entropy(h[keep], self.model.lm_head, y[keep])


def encode_conversations(conversations: list[Conversation], template: ChatTemplate, tok, seq_len: int,
                         skip_bad: bool) -> tuple[list[Example], list[str]]:
    """Token ids and masks of the conversations, and those longer than seq_len as bad rows (skip_bad),
    or a DataError at the first."""
    good, bad = [], []
    for c in conversations:
        ids, mask = template.encode(c.messages, tok)
        if len(ids) <= seq_len:
            good.append(Example(c.where, ids, mask))
            continue
        why = f"{c.where}: the conversation has {len(ids)} tokens, more than --seq-len {seq_len}"
        if not skip_bad:
            raise DataError(f"{why} (--skip-bad-rows leaves such rows out)")
        bad.append(why)
    return good, bad


class SFTObjective:
    """Conversations as what the training loop optimizes (see loop.Objective)."""

    select = ("val_loss", "min")

    def __init__(self, folder: Path, tok, template: ChatTemplate, train: list[Example], val: list[Example],
                 seed: int, info: dict):
        self.folder, self.tok, self.template, self.seed, self.info = folder, tok, template, seed, info
        self.train, self.val = train, val
        self.pad = pad_id_for(tok)
        self.lengths = np.array([len(e.ids) for e in train])
        self.labelled = np.array([sum(e.mask[1:]) for e in train])  # tokens predicted and trained, per example
        h = hashlib.sha256(f"{tok.hash()}/{template.describe()}/{self.pad}".encode())
        for exs in (train, val):
            for e in exs:
                h.update(np.array(e.ids, dtype=np.int64).tobytes() + np.array(e.mask, dtype=np.bool_).tobytes())
        self.data_hash = h.hexdigest()[:16]
        self._epoch: tuple[int, np.ndarray] | None = None

    # -- the loop's Objective interface -----------------------------------------------------------
    def start(self, cfg: TrainConfig, env, resumed: dict | None) -> GPT:
        """The model: the checkpoint's shape (weights restored by the loop), or --model's weights, whose
        answer loss on the validation split is measured first (`base_val_loss`)."""
        self.cfg, self.env = cfg, env
        if cfg.lora_r:  # the frozen bf16 base, also when resuming: the checkpoint then sets the adapters
            self.model = load_lora_base(self.folder, cfg, env.device)
        elif resumed is not None:
            self.model = GPT(GPTConfig(**resumed["model_config"])).to(env.device)
        else:
            self.model = load(self.folder, Layout(torch.float32), env.device)
        if resumed is None:
            autocast = torch.autocast(env.device.type, dtype=torch_dtype(cfg.dtype), enabled=cfg.dtype != "float32")
            self.info["base_val_loss"] = self._answer_loss(AnswerLoss(self.model), autocast)
        self.model.set_dropout(cfg.dropout)
        return self.model

    def wrap(self, model: GPT) -> nn.Module:
        return AnswerLoss(model)

    def _order(self, epoch: int) -> np.ndarray:
        """The example order of an epoch: a seeded permutation, cut into buckets of BUCKET global batches, each
        sorted by length and its batches shuffled: a batch pads little, and batch lengths still vary."""
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            G, perm, out = self.cfg.batch_size * self.cfg.grad_accum, rng.permutation(len(self.train)), []
            for s in range(0, len(perm), G * BUCKET):
                bucket = perm[s:s + G * BUCKET]
                bucket = bucket[np.argsort(self.lengths[bucket], kind="stable")]
                batches = [bucket[i:i + G] for i in range(0, len(bucket), G)]
                out += [batches[i] for i in rng.permutation(len(batches))]
            self._epoch = (epoch, np.concatenate(out))
        return self._epoch[1]

    def _step_rows(self, step: int) -> np.ndarray:
        """Example indices of step's global batch, read on through the epochs' orders."""
        G, N = self.cfg.batch_size * self.cfg.grad_accum, len(self.train)
        pos = np.arange(step * G, (step + 1) * G)
        return np.array([self._order(int(p // N))[p % N] for p in pos])

    def _mine(self, rows: np.ndarray, rank: int, n_micro: int) -> np.ndarray:
        B = self.cfg.batch_size
        mine = rows[rank * n_micro * B:(rank + 1) * n_micro * B]
        return mine[np.argsort(self.lengths[mine], kind="stable")]

    def _batch(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, labels) (B, T), right-padded; labels are the ids the model writes, -100 elsewhere."""
        ids = pad_rows([e.ids for e in examples], self.pad)
        labels = torch.full_like(ids, IGNORE)
        for i, e in enumerate(examples):
            labels[i, :len(e.ids)] = torch.where(torch.tensor(e.mask), ids[i, :len(e.ids)], IGNORE)
        return ids.to(self.env.device), labels.to(self.env.device)

    def micro_batches(self, step: int, n_micro: int) -> list:
        """This rank's n_micro (ids, labels, weight) of step's global batch; weight scales a micro-batch's mean
        loss so that the loop's mean over micro-batches and processes is the mean over the step's answer tokens."""
        B, rows = self.cfg.batch_size, self._step_rows(step)
        mine = self._mine(rows, self.env.rank, n_micro)
        total = int(self.labelled[rows].sum())
        out = []
        for i in range(n_micro):
            idx = mine[i * B:(i + 1) * B]
            weight = int(self.labelled[idx].sum()) * n_micro * self.env.world / total
            out.append((*self._batch([self.train[j] for j in idx]), weight))
        return out

    @staticmethod
    def loss(net, batch) -> torch.Tensor:
        ids, labels, weight = batch
        return net(ids, labels) * weight

    def tokens(self, step: int) -> int:
        """Tokens of step's global batch, padding included."""
        B, n_micro, rows = self.cfg.batch_size, self.cfg.grad_accum // self.env.world, self._step_rows(step)
        lengths = np.concatenate([self.lengths[self._mine(rows, r, n_micro)] for r in range(self.env.world)])
        return int(sum(len(c) * c.max() for c in (lengths[i:i + B] for i in range(0, len(lengths), B))))

    @torch.no_grad()
    def _answer_loss(self, net, autocast) -> float:
        """Mean NLL of the validation split's answer tokens (batches shared among ranks)."""
        B, W = self.cfg.batch_size, self.env.world
        order = sorted(range(len(self.val)), key=lambda i: len(self.val[i].ids))
        batches = [order[i:i + B] for i in range(0, len(order), B)]
        sums = torch.zeros(2, dtype=torch.float64, device=self.env.device)  # [loss sum, tokens]
        self.model.eval()  # no dropout
        for j in range(self.env.rank, math.ceil(len(batches) / W) * W, W):  # every rank runs as many forwards (FSDP)
            ids, labels = self._batch([self.val[i] for i in batches[min(j, len(batches) - 1)]])
            with autocast:
                loss = net(ids, labels, reduction="sum").double()
            if j < len(batches):
                sums[0] += loss
                sums[1] += (labels[:, 1:] != IGNORE).sum()
        self.model.train()
        loss, n = self.env.all_reduce(sums).tolist()
        return loss / n

    @torch.no_grad()
    def evaluate(self, net, autocast) -> dict:
        """The validation answer loss and perplexity, and the answer to sample_prompt."""
        loss = self._answer_loss(net, autocast)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)),
                "sample": self._sample() if self.cfg.sample_tokens else ""}

    def _sample(self) -> str:
        """The greedy answer to sample_prompt (repetition penalized), prompted as `kogpt serve` prompts, cut at
        the template's stops."""
        from ..generation.engine import generate_ids
        from ..generation.sampling import SamplingConfig

        prompt, stops = self.template.render([{"role": "user", "content": self.cfg.sample_prompt}])
        ids = self.tok.encode(prompt)
        n = min(self.cfg.sample_tokens, self.model.config.n_positions - len(ids))
        if n <= 0:
            return ""
        self.model.eval()
        eos = [] if self.tok.eos_id is None else [self.tok.eos_id]
        sampling = SamplingConfig(do_sample=False, repetition_penalty=1.2, no_repeat_ngram_size=3)  # no greedy loops
        new = generate_ids(self.model, [ids], max_new_tokens=n, eos_ids=eos, sampling=sampling)[0]
        self.model.train()
        text = self.tok.decode(new, skip_special_tokens=True)
        for s in stops:
            text = text.split(s)[0]
        return text.strip()

    def summary(self, step: int, m: dict) -> str:
        base = f" (base model {self.info['base_val_loss']:.4f})" if "base_val_loss" in self.info else ""
        return (f"step {step}: val answer loss {m['val_loss']:.4f}{base}, best at step {m['best_step']} | "
                f"{self.cfg.sample_prompt} → {m['sample']!r}")

    def describe(self) -> dict:
        return {"sft": {"model": str(self.folder), "chat_template": self.template.describe(), "pad_token_id": self.pad,
                        "train_conversations": len(self.train), "val_conversations": len(self.val), **self.info}}

    def save(self, state_dict: dict, folder: Path, step: int, metrics: dict) -> None:
        """The HF LM folder (with --lora-r the PEFT adapter folder) with the tokenizer and --model's
        generation_config.json (kogpt generate/serve use it)."""
        if self.cfg.lora_r:
            write_adapter(self.model, folder, base=str(self.folder))
        else:
            write_model(state_dict, self.model.config, folder)
        self.tok.save(folder)
        if (self.folder / "generation_config.json").is_file():
            shutil.copyfile(self.folder / "generation_config.json", folder / "generation_config.json")


def _say(msg: str) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(msg)


def _check(sc: SFTConfig) -> None:
    check_scheduled(sc, ("train",))
    check_run_folder(Path(sc.loop.out), sc.loop.resume, sc.loop.overwrite)  # before the data and the model are read


def _examples(path: str, sc: SFTConfig, template: ChatTemplate, tok) -> tuple[list[Example], list[str]]:
    conversations, bad = read_conversations(path, sc.skip_bad_rows, sc.limit)
    examples, long = encode_conversations(conversations, template, tok, sc.loop.seq_len, sc.skip_bad_rows)
    if not examples:
        raise DataError(f"{path}: no conversation to train on ({len(bad) + len(long)} bad rows)")
    return examples, bad + long


def sft(sc: SFTConfig) -> TrainResult:
    """Tune sc.model on sc.train's conversations; the best validation checkpoint lands in out/model."""
    from ..text.tokenizer import Tokenizer

    _check(sc)
    folder = resolve(sc.model, sc.revision or None)
    require_language_model(folder, sc.model, "tune for chat (kogpt sft takes a language model)")
    mcfg = load_config(folder)  # read before the weights: bad flags fail fast
    if sc.loop.seq_len > mcfg.n_positions:
        raise UserError(f"--seq-len {sc.loop.seq_len} exceeds the model's n_positions {mcfg.n_positions}")
    try:
        tok = Tokenizer.from_dir(folder)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: no usable tokenizer (tokenizer.json, or vocab.json + merges.txt): {e}")
    template = ChatTemplate.from_file(sc.chat_template) if sc.chat_template else ChatTemplate.default()
    train_ex, bad = _examples(sc.train, sc, template, tok)
    if sc.val:
        val_ex, val_bad = _examples(sc.val, sc, template, tok)
        bad += val_bad
    elif len(train_ex) < 2:
        raise UserError(f"{sc.train}: {len(train_ex)} conversation(s), too few to hold out a validation split")
    else:
        perm = np.random.default_rng(SPLIT_SEED).permutation(len(train_ex))
        n_val = max(1, round(sc.val_fraction * len(train_ex)))
        val_ex, train_ex = [train_ex[i] for i in sorted(perm[:n_val])], [train_ex[i] for i in sorted(perm[n_val:])]
    if bad:
        _say(f"skipped {len(bad)} bad row(s) (--skip-bad-rows); the first: {bad[0]}")
    dropout = sc.dropout if sc.dropout >= 0 else load_dropout(folder)  # transformers' rule: the config's
    loop = scheduled(sc.loop, sc, len(train_ex), str(folder), dropout)
    objective = SFTObjective(folder, tok, template, train_ex, val_ex, loop.seed, {"skipped_rows": len(bad)})
    return train(loop, objective)

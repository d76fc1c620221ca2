"""Finetuning a GPT with a score head on NSMC, KLUE-YNAT, KorSTS or KLUE-STS, on THE training loop.

ClassifierObjective plugs into the training loop (loop.py): the training examples framed as
KoGPT2-subtasks does (evaluation/classify.frame; pairs in both orders, as augmentation), shuffled per epoch
with the seed, right-padded per micro-batch; cross-entropy on the label, or MSE on the 0–5 score.
Each validation scores the validation split (carved from the training file, or --val) and,
separately, a fixed sample of the training examples; the best validation score picks the exported
folder — the evaluation file is never seen. FinetuneConfig (a ScheduledConfig) holds the loop's
TrainConfig, with the KoGPT2-subtasks recipe as its defaults.

    finetune(FinetuneConfig.from_settings(model="kogpt-mini", task="nsmc", train="ratings_train.txt", out="runs/nsmc"))
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.classifier import INPUT_FORMAT, Classifier, Head
from ..core.layout import Layout
from ..evaluation.classify import frame, outputs, pad_id_for, pad_rows, to_predictions
from ..hf.folder import CheckpointError, is_classifier, load_config, load_dropout, read_head
from ..hf.hub import resolve
from ..hf.load import load
from ..hf.peft import write_adapter
from ..hf.save import write_model
from ..core.config import GPTConfig
from ..errors import UserError
from ..core.model import GPT
from ..evaluation.tasks import Example, Prediction, Task, get_task
from ..evaluation.tasks.base import split_examples
from .loop import TrainResult, check_run_folder, train
from .config import COUNT, ScheduledConfig, TrainConfig, check_scheduled, option, scheduled
from .lora import load_lora_base

SPLIT_SEED = 0  # the validation split is the same whatever --seed is, so runs compare on the same examples
PROBE = 2000  # training examples scored at each validation (at most as many as the validation split)
HEADLINE = {"nsmc": "accuracy", "ynat": "macro_f1", "korsts": "spearman", "klue-sts": "f1"}  # reported and selected


# the loop's settings finetuning starts from: the KoGPT2-subtasks recipe (batch 32 × 4 = 128, lr 5e-5 decayed by
# cosine to 0, AdamW betas (0.9, 0.999), weight decay 0.01), no sample text at validations, --out required
RECIPE = dict(out="", batch_size=32, grad_accum=4, seq_len=64, lr=5e-5, min_lr=0.0, weight_decay=0.01, beta2=0.999,
              keep_last=2, sample_tokens=0)
# what a loop setting means when finetuning, where its TrainConfig help (pretraining's) would mislead
LOOP_HELP = {"out": "run folder: log.jsonl, loss.png, checkpoints/ and model/ (the best classifier, HF format)",
             "seq_len": "tokens per input, separators included; longer texts are cut at the end",
             "lr": "peak learning rate (AdamW), decayed by cosine to 0",
             "seed": "seed of the head's init and the data order"}


@dataclass
class FinetuneConfig(ScheduledConfig):
    """What to finetune on which task's files, and the schedule in finetuning's terms; the training loop's
    own settings in `loop`. finetune() sets the loop's init_from, max_steps, warmup_steps, dropout,
    eval_every and save_every from these once the examples are framed and the model is found."""

    train: str = option("", "the task's training file, in its official format", metavar="PATH")
    epochs: float = option(3.0, "passes over the training rows (pair tasks have two per example: both orders)")
    loop: TrainConfig = field(default_factory=lambda: TrainConfig(**RECIPE))
    # finetuning's own
    task: str = option("", "the benchmark: nsmc, ynat, korsts or klue-sts", metavar="TASK")
    eval_batch_size: int = option(64, "inputs per forward when validating")
    # shared settings, as finetuning words them
    model: str = option("", "model folder (HF format), bundled model name or hub id: an LM, or a classifier "
                            "to continue", metavar="MODEL")
    limit: int = option(0, "use only the first N examples of each file (0: all)")
    dropout: float = option(-1.0, "share of embeddings, attention weights and residual branches dropped while "
                                  "training; negative: the model's config.json, as transformers finetunes it "
                                  "(0.1 for KoGPT2, 0 for kogpt-mini)")


FIELDS = FinetuneConfig.own_fields()


class ClassifierObjective:
    """A benchmark's examples, framed, as what the training loop optimizes (see loop.Objective)."""

    def __init__(self, task: Task, folder: Path, train: list[Example], val: list[Example], *, seq_len: int,
                 seed: int, eval_batch_size: int):
        from ..text.tokenizer import Tokenizer

        self.task, self.folder, self.seed, self.eval_batch_size = task, folder, seed, eval_batch_size
        self.head = Head.for_task(task, seq_len)
        self.select = (f"val_{HEADLINE[task.name]}", "max")
        mcfg = load_config(folder)  # read before the weights: bad flags fail fast
        if seq_len > mcfg.n_positions:
            raise UserError(f"--seq-len {seq_len} exceeds the model's n_positions {mcfg.n_positions}")
        try:
            self.tok = Tokenizer.from_dir(folder)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{folder}: no usable tokenizer (tokenizer.json, or vocab.json + merges.txt): {e}")
        self.pad = pad_id_for(self.tok)
        self.train, self.val = train, val
        self.rows, owner = frame(self.tok, train, seq_len, self.pad, mcfg.vocab_size)
        gold = [e.score if self.head.regression else e.label for e in train]
        dtype = torch.float32 if self.head.regression else torch.long
        self.targets = torch.tensor([gold[i] for i in owner], dtype=dtype)
        self.lengths = np.array([len(r) for r in self.rows])
        probe = np.random.default_rng(SPLIT_SEED).permutation(len(train))[:min(len(train), len(val), PROBE)]
        self.probe = [train[i] for i in sorted(probe)]  # a fixed sample of training examples for the train metrics
        self.framed = {name: (exs, *frame(self.tok, exs, seq_len, self.pad, mcfg.vocab_size))
                       for name, exs in (("val", val), ("train", self.probe))}
        h = hashlib.sha256(f"{self.tok.hash()}/{task.name}/{INPUT_FORMAT}/{seq_len}/{self.pad}".encode())
        for exs in (train, val):
            h.update(repr([(e.text, e.text_pair, e.label, e.score) for e in exs]).encode())
        self.data_hash = h.hexdigest()[:16]
        self._perm: tuple[int, np.ndarray] | None = None

    # -- the loop's Objective interface -----------------------------------------------------------
    def start(self, cfg: TrainConfig, env, resumed: dict | None) -> Classifier:
        """The classifier: the checkpoint's shape, or --model's weights (a classifier's head is kept
        when its labels are this task's) with a new head; pad_token_id set for the framing."""
        self.cfg, self.env = cfg, env
        n = len(self.head.labels)
        if cfg.lora_r:  # a frozen bf16 base (also when resuming: the checkpoint then sets adapters and head)
            base = load_lora_base(self.folder, cfg, env.device)
            if isinstance(base, Classifier) and read_head(self.folder)[0].labels == self.head.labels:
                model = base
                model.score.float().requires_grad_(True)  # the head trains, in fp32
            else:
                model = Classifier(base.gpt if isinstance(base, Classifier) else base, n)
        elif resumed is not None:
            model = Classifier(GPT(GPTConfig(**resumed["model_config"])), n)
        elif is_classifier(self.folder):
            clf = load(self.folder, Layout(torch.float32))
            model = clf if read_head(self.folder)[0].labels == self.head.labels else Classifier(clf.gpt, n)
        else:
            model = Classifier(load(self.folder, Layout(torch.float32)), n)
        model.gpt.config = model.config.replace(pad_token_id=self.pad)
        model.gpt.set_dropout(cfg.dropout)
        self.model = model.to(env.device)
        return self.model

    def wrap(self, model: Classifier) -> torch.nn.Module:
        return model

    def _order(self, step: int) -> np.ndarray:
        """Row indices of the global batch of `step`: a seeded permutation per epoch, read in order."""
        G, N = self.cfg.batch_size * self.cfg.grad_accum, len(self.rows)
        pos = np.arange(step * G, (step + 1) * G)
        out = np.empty(G, dtype=np.int64)
        for epoch in np.unique(pos // N):
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (int(epoch), np.random.default_rng([self.seed, int(epoch)]).permutation(N))
            here = pos // N == epoch
            out[here] = self._perm[1][pos[here] % N]
        return out

    def _mine(self, step: int, rank: int, n_micro: int) -> np.ndarray:
        """Rank's rows of step's global batch, sorted by length: micro-batches of alike rows pad little
        (each has B rows, so the step's mean loss and gradient are those of any order)."""
        B = self.cfg.batch_size
        mine = self._order(step)[rank * n_micro * B:(rank + 1) * n_micro * B]
        return mine[np.argsort(self.lengths[mine], kind="stable")]

    def micro_batches(self, step: int, n_micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's n_micro (ids (B, T), targets (B,)) of step's global batch, padded to their longest row."""
        B, mine = self.cfg.batch_size, self._mine(step, self.env.rank, n_micro)
        out = []
        for i in range(n_micro):
            idx = mine[i * B:(i + 1) * B]
            ids = pad_rows([self.rows[j] for j in idx], self.pad, self.env.device)
            out.append((ids, self.targets[torch.from_numpy(idx)].to(self.env.device)))
        return out

    def loss(self, net, batch) -> torch.Tensor:
        ids, y = batch
        out = net(ids).float()  # (B, num_labels)
        return F.mse_loss(out[:, 0], y) if self.head.regression else F.cross_entropy(out, y)

    def tokens(self, step: int) -> int:
        """Tokens of step's global batch, padding included."""
        B, n_micro = self.cfg.batch_size, self.cfg.grad_accum // self.env.world
        lengths = np.concatenate([self.lengths[self._mine(step, r, n_micro)] for r in range(self.env.world)])
        return int(sum(len(c) * c.max() for c in (lengths[i:i + B] for i in range(0, len(lengths), B))))

    @torch.no_grad()
    def evaluate(self, net, autocast) -> dict:
        """Loss and the task's metrics on the validation split and, separately, on a training sample."""
        metrics = {}
        self.model.eval()
        for name, (exs, rows, owner) in self.framed.items():
            out = outputs(self.model, rows, self.eval_batch_size, autocast, part=(self.env.rank, self.env.world))
            out = self.env.all_reduce(out.to(self.env.device)).cpu()  # each row was computed by one rank
            preds = to_predictions(self.head, out, owner, len(exs))
            metrics[f"{name}_loss"] = _loss(self.head, exs, preds)
            metrics.update({f"{name}_{k}": v for k, v in self.task.metrics(exs, preds).items()})
        self.model.train()
        return metrics

    def summary(self, step: int, m: dict) -> str:
        k = HEADLINE[self.task.name]
        return (f"step {step}: val {k} {m[f'val_{k}']:.4f}, loss {m['val_loss']:.4f} | train {k} "
                f"{m[f'train_{k}']:.4f}, loss {m['train_loss']:.4f} | best val {k} at step {m['best_step']}")

    def describe(self) -> dict:
        return {"finetune": {"task": self.task.name, "model": str(self.folder), "train_examples": len(self.train),
                             "val_examples": len(self.val), "train_rows": len(self.rows),
                             "input_format": INPUT_FORMAT, "pad_token_id": self.pad}}

    def save(self, state_dict: dict, folder: Path, step: int, metrics: dict) -> None:
        """The classifier folder (HF format) with the tokenizer; config.json names the step and its val metrics."""
        if self.cfg.lora_r:  # the PEFT adapter folder: LoRA layers and the head (modules_to_save)
            write_adapter(self.model, folder, str(self.folder), self.head, best_step=step, pad_token_id=self.pad,
                          val_metrics={k: v for k, v in metrics.items() if k.startswith("val_")})
        else:
            write_model(state_dict, self.model.config, folder, self.head, best_step=step,
                        val_metrics={k: v for k, v in metrics.items() if k.startswith("val_")})
        self.tok.save(folder)


def _loss(head: Head, examples: list[Example], preds: list[Prediction]) -> float:
    """Mean cross-entropy of the gold label, or mean squared error of the score."""
    if head.regression:
        return sum((p.score - e.score) ** 2 for e, p in zip(examples, preds)) / len(examples)
    return -sum(p.logprobs[e.label] for e, p in zip(examples, preds)) / len(examples)


def _check(fc: FinetuneConfig) -> None:
    check_scheduled(fc, ("task", "train"), {"eval_batch_size": COUNT})
    check_run_folder(Path(fc.loop.out), fc.loop.resume, fc.loop.overwrite)  # before the data and the model are read


def finetune(fc: FinetuneConfig) -> TrainResult:
    """Finetune fc.model on fc.task's training file; the best validation checkpoint lands in out/model."""
    _check(fc)
    task = get_task(fc.task)
    limit = fc.limit or None
    train_ex = task.load(fc.train)[:limit]
    if fc.val:
        val_ex = task.load(fc.val)[:limit]
    elif len(train_ex) < 2:
        raise UserError(f"{fc.train}: {len(train_ex)} example(s), too few to hold out a validation split")
    else:
        train_ex, val_ex = split_examples(train_ex, fc.val_fraction, SPLIT_SEED)
    loop = fc.loop
    objective = ClassifierObjective(task, resolve(fc.model, fc.revision or None), train_ex, val_ex,
                                    seq_len=loop.seq_len, seed=loop.seed, eval_batch_size=fc.eval_batch_size)
    dropout = fc.dropout if fc.dropout >= 0 else load_dropout(objective.folder)  # transformers' rule: the config's
    return train(scheduled(loop, fc, len(objective.rows), str(objective.folder), dropout), objective)

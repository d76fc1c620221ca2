"""LMObjective: what pretraining plugs into the training loop (loop.py).

Random windows of the token memmaps of `kogpt prepare`, the fused next-token loss (loss.py), and
validation loss / perplexity / bits per byte with a short sample. The model is a preset shape, an
HF folder (--init-from, continued pretraining) or a checkpoint's; the export is an HF LM folder.
It implements loop.Objective, as finetune.ClassifierObjective does.

    train(cfg)  # LMObjective(cfg, read_meta(cfg.data), env) is the default objective
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..core.layout import Layout
from ..hf.folder import load_config, require_language_model
from ..hf.hub import resolve
from ..hf.load import load
from ..hf.peft import write_adapter
from ..hf.save import write_model
from ..core.config import GPTConfig
from ..data.tokens import TOKENIZER_DIR, BatchSampler, DataError
from ..errors import UserError
from .loss import LMLoss
from ..core.model import GPT
from .config import TrainConfig
from .lora import load_lora_base


class LMObjective:
    """Pretraining: random windows of the prepared token memmaps, next-token loss, val loss/ppl/bpb."""

    select = None  # no best-checkpoint selection: the model folder is written at the end

    def __init__(self, cfg: TrainConfig, meta: dict, env):
        self.cfg, self.env, self.meta = cfg, env, meta
        self.tok = _load_tokenizer(cfg, meta)
        self.train = BatchSampler.from_dir(cfg.data, "train", cfg.seq_len, cfg.seed, cfg.weights, meta)
        if meta["splits"]["val"]["tokens"] < cfg.seq_len + 1:
            raise DataError(f"the val split of {cfg.data} has {meta['splits']['val']['tokens']} tokens, fewer than "
                            f"seq_len + 1: prepare with a larger --val-fraction or train with a shorter --seq-len")
        self.val = BatchSampler.from_dir(cfg.data, "val", cfg.seq_len, seed=0, meta=meta)
        self.sources = [s["name"] for s in meta["sources"]]

    @property
    def data_hash(self) -> str:
        """What a checkpoint must have been trained on to resume: the data's tokenizer."""
        return self.meta["tokenizer"]["hash"]

    def start(self, cfg: TrainConfig, env, resumed: dict | None) -> GPT:
        """The model to train: the checkpoint's shape, --init-from's weights, or a preset."""
        self.cfg, self.env = cfg, env
        mcfg = _model_config(self.cfg, self.tok, resumed)
        if cfg.lora_r:  # the frozen base again when resuming too: the checkpoint then sets the adapters
            self.model = load_lora_base(resolve(cfg.init_from), cfg, env.device)
        elif self.cfg.init_from and resumed is None:
            self.model = load(resolve(self.cfg.init_from), Layout(torch.float32), self.env.device)
        else:
            with self.env.device:
                self.model = GPT(mcfg)
        self.model.set_dropout(cfg.dropout)
        return self.model

    def wrap(self, model: GPT) -> torch.nn.Module:
        return LMLoss(model)

    def micro_batches(self, step: int, n_micro: int) -> list[torch.Tensor]:
        """This rank's n_micro micro-batches (B, T+1) of the global batch of optimizer step `step`."""
        B = self.cfg.batch_size
        starts, _ = self.train.starts(step, B * self.cfg.grad_accum)
        mine = starts[self.env.rank * n_micro * B:(self.env.rank + 1) * n_micro * B]
        return [self.train.read(mine[i * B:(i + 1) * B]).to(self.env.device) for i in range(n_micro)]

    @staticmethod
    def loss(net, batch: torch.Tensor) -> torch.Tensor:
        return net(batch)

    def tokens(self, step: int) -> int:
        """Tokens of the global batch of `step`."""
        return self.cfg.batch_size * self.cfg.grad_accum * self.cfg.seq_len

    @torch.no_grad()
    def evaluate(self, net, autocast) -> dict:
        """Loss, perplexity and bits per byte on fixed val batches (shared among ranks), loss per source, a sample."""
        n, S = self.cfg.eval_batches, len(self.sources)
        sums = torch.zeros(2, S, dtype=torch.float64, device=self.env.device)  # [loss sum, rows] per source
        self.model.eval()  # no dropout
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
        sample = _sample(self.model, self.tok, self.cfg, self.env) if self.cfg.sample_tokens else ""
        self.model.train()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_bpb": bpb,
                "val_loss_by_source": {self.sources[i]: round(loss_s[i], 4) for i in seen}, "sample": sample}

    @staticmethod
    def summary(step: int, m: dict) -> str:
        return (f"step {step}: val loss {m['val_loss']:.4f}, ppl {m['val_ppl']:.1f}, bpb {m['val_bpb']:.4f} "
                f"| {m['sample']!r}")

    def describe(self) -> dict:
        return {}

    def save(self, state_dict: dict, folder: Path, step: int, metrics: dict) -> None:
        """The HF-format LM folder (config.json, model.safetensors), or with --lora-r the PEFT adapter folder,
        plus the tokenizer files (rank 0)."""
        if self.cfg.lora_r:
            write_adapter(self.model, folder, base=self.cfg.init_from)
        else:
            write_model(state_dict, self.model.config, folder)
        self.tok.save(folder)


def _load_tokenizer(cfg: TrainConfig, meta: dict):
    from ..text.tokenizer import Tokenizer

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
    elif cfg.init_from or cfg.lora_r:
        if not cfg.init_from:
            raise UserError("--lora-r trains adapters on a trained model: pass it with --init-from")
        if shape:
            raise UserError(f"{', '.join(shape)} shape a new model from a preset; --init-from keeps the model's shape")
        folder = resolve(cfg.init_from)
        require_language_model(folder, cfg.init_from, "continue pretraining (--init-from takes a language model)")
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


def _sample(model: GPT, tok, cfg: TrainConfig, env) -> str:
    from ..generation.engine import generate_ids
    from ..generation.sampling import SamplingConfig

    start = [] if tok.start_id is None else [tok.start_id]  # the one start-token rule (Tokenizer.start_id)
    prompt = [*start, *tok.encode(cfg.sample_prompt)]
    n = min(cfg.sample_tokens, model.config.n_positions - len(prompt))
    if n <= 0 or not prompt:
        return ""
    rng = torch.Generator(env.device).manual_seed(cfg.seed)
    with torch.no_grad():
        new = generate_ids(model, [prompt], max_new_tokens=n, sampling=SamplingConfig(temperature=0.8, top_k=50),
                           eos_ids=[] if tok.eos_id is None else [tok.eos_id], rng=rng)[0]
    # decoded together: the space after the prompt stays
    return tok.decode(prompt[len(start):] + new, skip_special_tokens=True)

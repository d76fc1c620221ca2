"""PEFT-format LoRA adapters, both ways: `adapter_config.json` + `adapter_model.safetensors` as the `peft`
library writes and reads them (peft.PeftModel.from_pretrained loads kogpt's; kogpt loads peft's).

Keys are `base_model.model.<HF module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), for GPT-2's
Conv1D too (peft's fan_in_fan_out transposes only when merging). GPT-J's q_proj/k_proj/v_proj pairs are
the slices of kogpt's fused attn.qkv (core/lora.py). A classifier's `score` head is a `modules_to_save`
tensor (task SEQ_CLS): any such tensor replaces the base's tensor of that HF name when loading. What the
head means (task, labels, framing) goes to kogpt_finetune.json beside them (peft warns on unknown config keys).

    write_adapter(model, "out/adapter"); model = load(base, layout, adapter="out/adapter")  # kogpt.hf.load
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.classifier import INPUT_FORMAT, Classifier, Head
from ..core.config import GPTConfig
from ..core.lora import MODULES, SLICES, LoRABank, LoRAConfig, lora_banks, lora_layers
from ..core.model import GPT
from ..errors import UserError
from ..fileio import atomic_write, write_json
from .convert import name_map
from .folder import ADAPTER_CONFIG, CONFIG_FILE, CheckpointError, read_json

ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_FILE = "kogpt_finetune.json"  # a classifier adapter's Head: task, labels, seq_len, input_format, run info
TASKS = {False: "CAUSAL_LM", True: "SEQ_CLS"}  # peft task_type of an LM / a sequence classifier
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"transformer\.h\.(\d+)\.(.+)\.lora_([AB])\.weight")
_UNSUPPORTED = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform", "lora_bias")


def _hf_modules(cfg: GPTConfig) -> dict[str, str]:
    """HF module name inside a block (e.g. `attn.c_attn`, `attn.q_proj`) -> kogpt target (core/lora.py):
    a module of MODULES, or for the three GPT-J projections fused into attn.qkv, their SLICES names."""
    layer = name_map(cfg)
    out = {}
    for module in MODULES:
        hf = [n.removeprefix("transformer.h.0.").removesuffix(".weight") for n in layer[f"h.0.{module}.weight"][0]]
        out.update(zip(hf, SLICES) if len(hf) == len(SLICES) else [(hf[0], module)])
    return out


@dataclass
class Adapter:
    """A PEFT LoRA adapter read for a base model: its LoRAConfig, the A/B of each kogpt layer and slice,
    and the HF tensors it replaces (modules_to_save, e.g. a classifier's score.weight)."""

    lora: LoRAConfig
    classifier: bool
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = field(default_factory=dict)  # (h.i, target) -> A, B
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)
    folder: Path = Path()
    pad_token_id: int | None = None  # the pad id a kogpt classifier adapter was trained with (HEAD_FILE)


def adapter_base(folder: str | os.PathLike) -> str | None:
    """The base model an adapter folder names (base_model_name_or_path), when `folder` holds an adapter and no
    model of its own; else None."""
    folder = Path(folder)
    if (folder / CONFIG_FILE).exists() or not (folder / ADAPTER_CONFIG).is_file():
        return None
    base = read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: no base_model_name_or_path; pass the base model and "
                              f"this folder as its adapter")
    return base


def read_adapter(folder: str | os.PathLike, cfg: GPTConfig) -> Adapter:
    """The PEFT LoRA adapter in `folder` for a base of config `cfg`; CheckpointError (one line) when a file
    is missing, the adapter is not a plain LoRA, or it targets what the base does not have."""
    folder = Path(folder)
    d = read_json(folder / ADAPTER_CONFIG)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS} (a PEFT adapter folder has it next to {ADAPTER_CONFIG})")
    if d.get("peft_type") != "LORA" or d.get("task_type") not in TASKS.values():
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: kogpt reads LoRA adapters for CAUSAL_LM or SEQ_CLS, "
                              f"not {d.get('peft_type')} {d.get('task_type')}")
    odd = [k for k in _UNSUPPORTED if d.get(k)]
    if odd or d.get("bias", "none") != "none":
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: {odd[0] if odd else 'bias'} is not supported")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: cannot read ({e})") from None
    names, pairs, replaced = _hf_modules(cfg), {}, {}
    for key, t in tensors.items():
        hf = key.removeprefix(_PREFIX)
        m = _LORA_KEY.fullmatch(hf)
        if m is None:
            replaced[hf] = t
            continue
        i, module, ab = int(m[1]), m[2], m[3]
        if i >= cfg.n_layer or module not in names:
            raise CheckpointError(f"{weights}: the adapter targets {hf.rpartition('.lora_')[0]}, "
                                  f"which the base model does not have")
        pairs.setdefault((f"h.{i}", names[module]), {})[ab] = t.float()
    targets = {target for _, target in pairs}
    if not pairs or set(pairs) != {(f"h.{i}", t) for i in range(cfg.n_layer) for t in targets}:
        raise CheckpointError(f"{weights}: kogpt needs the same LoRA modules in every layer of the base")
    try:
        lora = LoRAConfig(int(d["r"]), float(d.get("lora_alpha", 8)), float(d.get("lora_dropout") or 0.0),
                          tuple(sorted(targets)))
    except (KeyError, TypeError, ValueError, UserError) as e:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: bad LoRA settings ({e})") from None
    pad = (read_adapter_head(folder) or (None, {}))[1].get("pad_token_id")
    return Adapter(lora, d["task_type"] == TASKS[True], pairs, replaced, folder, pad)


def _pairs(model: GPT | Classifier) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(block `h.i`, target (a MODULES or SLICES name), A (r, in), B (out, r)) of each A/B pair of the model."""
    for name, layer in lora_layers(model).items():
        block, module = name.removeprefix("gpt.").rsplit(".", 2)[0], ".".join(name.split(".")[-2:])
        targets = SLICES if layer.groups == len(SLICES) else (module,)
        for k, s in enumerate(layer.slices):
            yield block, targets[s], *layer.pair(k)


def attach_adapter(model: GPT | Classifier, adapter: Adapter, index: int = 0, always: bool = True,
                   dtype: torch.dtype | None = None) -> None:
    """Add the adapter, frozen, as adapter `index` of a LoRABank on each linear it targets (the linear, of
    whatever kind, becomes the bank's base); its A and B in `dtype` (default fp32). always: it updates every
    row of every forward; False: only the rows a route gives it (core/lora.ROUTE, multi-adapter serving)."""
    gpt = model.gpt if isinstance(model, Classifier) else model
    lora, blocks = adapter.lora, {}
    for i in range(gpt.config.n_layer):
        for module in MODULES:
            adapted = lora.adapts(f"h.{i}.{module}", gpt.config.family)
            if not adapted:
                continue
            groups, slices = adapted
            layer = gpt.get_submodule(f"h.{i}.{module}")
            size = layer.out_features // groups
            A, B = [], torch.zeros(layer.out_features, len(slices) * lora.r)
            for k, s in enumerate(slices):
                target = SLICES[s] if groups == len(SLICES) else module
                a, b = (_tensor(adapter, f"h.{i}", target, ab, shape)
                        for ab, shape in (("A", (lora.r, layer.in_features)), ("B", (size, lora.r))))
                A.append(a)
                B[s * size:(s + 1) * size, k * lora.r:(k + 1) * lora.r] = b * (lora.alpha / lora.r)
            blocks[f"h.{i}.{module}"] = torch.cat(A), B
    for path, (A, B) in blocks.items():
        parent, _, child = path.rpartition(".")
        holder = gpt.get_submodule(parent)
        bank = getattr(holder, child)
        if not isinstance(bank, LoRABank):
            bank = LoRABank(bank)
            setattr(holder, child, bank)
        bank.add(index, A, B, always, dtype or torch.float32)


def _tensor(adapter: Adapter, block: str, target: str, ab: str, shape: tuple[int, int]) -> torch.Tensor:
    t = adapter.pairs.get((block, target), {}).get(ab)
    if t is None or tuple(t.shape) != shape:
        got = "no tensor" if t is None else f"shape {tuple(t.shape)}"
        raise CheckpointError(f"{adapter.folder}: lora_{ab} of {block}.{target} has {got}; r={adapter.lora.r} "
                              f"({ADAPTER_CONFIG}) on this base needs {shape}")
    return t.float()


def write_adapter(model: GPT | Classifier, folder: str | os.PathLike, base: str | None = None,
                  head: Head | None = None, **info) -> None:
    """The PEFT adapter folder of a model's LoRA layers (and a Classifier's score head, as modules_to_save),
    each file written atomically. base: the base model's name or path, recorded for peft; head: what a
    Classifier's outputs mean, written with `info` (e.g. best_step) to HEAD_FILE."""
    layers = lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA layers to save as an adapter")
    classifier = isinstance(model, Classifier)
    hf_of = {target: hf for hf, target in _hf_modules(model.config).items()}
    tensors, modules = {}, set()
    first = next(iter(layers.values()))
    for block, target, A, B in _pairs(model):
        modules.add(hf_of[target])
        key = f"{_PREFIX}transformer.{block}.{hf_of[target]}"
        tensors[f"{key}.lora_A.weight"] = A.detach().float().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = B.detach().float().contiguous().cpu()
    if classifier:
        tensors[f"{_PREFIX}score.weight"] = model.score.weight.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA", "task_type": TASKS[classifier], "base_model_name_or_path": base,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": first.dropout,
        "target_modules": sorted(modules), "fan_in_fan_out": model.config.family == "gpt2",  # GPT-2's Conv1D
        "bias": "none", "modules_to_save": ["score"] if classifier else None,
        "init_lora_weights": True, "inference_mode": True, "use_rslora": False, "use_dora": False,
    }
    folder = Path(folder)
    atomic_write(folder / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_json(folder / ADAPTER_CONFIG, config)
    if head is not None:
        write_json(folder / HEAD_FILE, {"task": head.task, "labels": list(head.labels), "seq_len": head.seq_len,
                                        "input_format": head.input_format, **info})


def read_adapter_head(folder: str | os.PathLike) -> tuple[Head, dict] | None:
    """(Head, the run's info: pad_token_id, best_step, ...) of a classifier adapter's HEAD_FILE (None without one)."""
    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        return None
    d = read_json(path)
    try:
        head = Head(d.pop("task", None), tuple(map(str, d.pop("labels"))), int(d.pop("seq_len")),
                    d.pop("input_format", INPUT_FORMAT))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad head description ({e})") from None
    return head, d


def merged_state_dict(model: GPT | Classifier) -> dict[str, torch.Tensor]:
    """The model's state dict with each LoRA update (trained, or an attached adapter's) folded into its weight."""
    sd = model.state_dict()
    for name, layer in {**lora_layers(model), **lora_banks(model)}.items():
        for key in [k for k in sd if k.startswith(f"{name}.")]:
            del sd[key]
        sd[f"{name}.weight"] = layer.merged_weight().detach()
        if layer.bias is not None:
            sd[f"{name}.bias"] = layer.bias.detach()
    return sd

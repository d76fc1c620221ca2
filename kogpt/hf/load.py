"""THE way a model folder becomes a module: `load(folder, layout, device)`.

config.json names the model: a GPT (GPT2LMHeadModel / GPTJForCausalLM) or a sequence Classifier
(*ForSequenceClassification). It is built on the meta device, and each tensor streams from the weight
files (weights.py) through the one conversion (convert.py) into it, cast to the layout's dtype; each
Linear becomes the layout's final layer as soon as its weight and bias are read (core/layout.py). So no
float copy of the whole model ever exists: the peak memory is the loaded model plus about one tensor.

    model = load(resolve("skt/kogpt2-base-v2"), "int8")  # resolve: kogpt.hf.hub
"""

from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from ..core.classifier import Classifier
from ..core.layout import Layout, on_meta
from ..core.lora import LoRABank, LoRALinear
from ..core.model import GPT
from .convert import ConversionError, dtype_from_hf, from_hf, is_classifier_config
from .folder import CONFIG_FILE, CheckpointError, load_config, read_head, read_json
from .peft import attach_adapter, read_adapter
from .weights import open_weights


def load(folder: str | os.PathLike, layout: str | Layout = "auto", device: str | torch.device = "cpu",
         adapter: str | os.PathLike | None = None) -> GPT | Classifier:
    """The model of a local HF-format folder, in eval mode: a GPT, or a Classifier when config.json names
    a *ForSequenceClassification. layout: a --dtype name (core/dtypes.NAMES; "auto": the checkpoint's dtype)
    or a Layout, e.g. Layout(torch.float32) for training (plain nn.Linear). adapter: a PEFT LoRA adapter
    folder (hf/peft.py) applied on top without merging: each targeted linear, of the layout's kind, is
    the base of a LoRABank holding the adapter; a SEQ_CLS adapter makes a Classifier with the adapter's score head."""
    folder = Path(folder)
    layout = layout if isinstance(layout, Layout) else Layout.parse(layout)
    raw = read_json(folder / CONFIG_FILE)
    classifier = is_classifier_config(raw)
    if classifier:
        head, config = read_head(folder, raw)
        num_labels = len(head.labels)
    else:
        config = load_config(folder, raw)
    extra = {}  # HF name -> tensor that replaces the folder's (an adapter's modules_to_save)
    if adapter is not None:
        adapter = read_adapter(adapter, config)
        extra = dict(adapter.replaced)
        if adapter.pad_token_id is not None:  # a classifier reads the last token that is not this pad
            config = config.replace(pad_token_id=adapter.pad_token_id)
        if adapter.classifier and not classifier:
            classifier, num_labels = True, len(extra.get("score.weight", ()))
    with unfragmented(), open_weights(folder) as weights:
        layout = layout.resolve(layout.dtype or dtype_from_hf(raw) or weights.dtype(), device)
        with on_meta():
            model = Classifier(GPT(config), num_labels) if classifier else GPT(config)
        fill = _Filler(model, layout, device)

        def get(name: str) -> torch.Tensor:
            return extra.pop(name).to(layout.dtype) if name in extra else weights.get(name, layout.dtype)

        try:
            for name, t in from_hf(get, [*weights.names, *extra], config, classifier):
                fill.put(name, t)
                del t
        except ConversionError as e:
            raise CheckpointError(f"{folder}: {e}") from None
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"{folder}: no tensor for {sorted(left)[:3]}")
    if adapter is not None:
        if extra:
            raise CheckpointError(f"{adapter.folder}: the adapter replaces {sorted(extra)[0]}, "
                                  f"which the base model does not have")
        attach_adapter(model, adapter, dtype=adapter_dtype(model))
    return model.eval()


def adapter_dtype(model: GPT | Classifier) -> torch.dtype | None:
    """The dtype adapters are served in on this loaded model: fp32 (None) on the CPU, where rank-16 matmuls
    run 3-6x faster in fp32 than in bf16 (docs/finetune.md) and the adapters are small; on a GPU, the
    embeddings' 16-bit dtype beside a 16-bit or quantized base."""
    gpt = model.gpt if isinstance(model, Classifier) else model
    w = gpt.wte.weight
    layer = gpt.h[0].attn.proj
    layer = layer.base if isinstance(layer, (LoRABank, LoRALinear)) else layer
    sixteen = type(layer) is not nn.Linear and w.dtype in (torch.bfloat16, torch.float16)
    return w.dtype if sixteen and w.device.type != "cpu" else None


class _Filler:
    """Puts each converted tensor into the meta-built model: floats as Parameters, and each Linear as the
    layout's layer once its weight (and bias) are in. A tied LM head takes the embeddings as its weight:
    the very Parameter in plain layouts (training updates one tensor), its own packed or int8 copy in
    the others."""

    def __init__(self, model: nn.Module, layout: Layout, device):
        self.model, self.layout, self.device = model, layout, device
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.parts: dict[str, dict[str, torch.Tensor]] = {}  # Linear -> its tensors read so far
        self.tied = isinstance(model, GPT) and model.config.tie_word_embeddings
        self.family = model.config.family

    def put(self, name: str, t: torch.Tensor) -> None:
        want = self.model.get_parameter(name).shape
        if t.shape != want:
            raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, the config needs {tuple(want)}")
        module, _, attr = name.rpartition(".")
        t = t.to(self.device)
        if module in self.linears:
            self._linear_part(module, attr, t)
        else:
            t = nn.Parameter(t)
            setattr(self.model.get_submodule(module), attr, t)
        if name == "wte.weight" and self.tied:
            self._linear_part("lm_head", "weight", t)

    def _linear_part(self, module: str, attr: str, t: torch.Tensor) -> None:
        parts = self.parts.setdefault(module, {})
        parts[attr] = t
        if len(parts) < (1 if self.linears[module].bias is None else 2):
            return
        del self.parts[module]
        parent, _, child = module.rpartition(".")
        layer = self.layout.make_linear(parts.pop("weight"), parts.pop("bias", None), module, self.family)
        setattr(self.model.get_submodule(parent), child, layer)


@contextmanager
def unfragmented():
    """Keep glibc's heap from fragmenting while loading: tensors are read, converted and freed one after
    another, and once glibc has freed a big mmap'ed block it serves blocks up to that size from the
    heap, where freed ones pin memory (up to ~1.5× the weights at the peak). Blocks of 128 KiB and
    more come from mmap while this is active (for the whole process); afterwards the thresholds stay
    fixed at glibc's own ceilings (mmap 32 MiB, trim 64 MiB) for the rest of the process. A no-op
    without glibc."""
    global _unfragmented_depth
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        yield
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    with _unfragmented_lock:
        _unfragmented_depth += 1
        mallopt(M_MMAP_THRESHOLD, 128 << 10)
    try:
        yield
    finally:
        with _unfragmented_lock:
            _unfragmented_depth -= 1
            if not _unfragmented_depth:  # glibc's own ceilings; setting them stops its adaptive resizing
                mallopt(M_MMAP_THRESHOLD, 32 << 20)
                mallopt(M_TRIM_THRESHOLD, 64 << 20)


_unfragmented_depth = 0
_unfragmented_lock = threading.Lock()

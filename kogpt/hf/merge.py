"""`merge_adapter`: a base model plus a PEFT LoRA adapter → one plain HF folder, the update folded into the
weights (W + B·A·alpha/r), so transformers, vLLM or `kogpt serve` run it without peft and without kogpt's
LoRA layers. The tokenizer, generation config and other non-weight files of the base are copied beside it.

    merge_adapter("skt/kogpt2-base-v2", "runs/nsmc/adapter", "nsmc-merged")
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..core.classifier import Classifier, Head
from ..core.layout import Layout
from ..fileio import atomic_write
from .folder import CONFIG_FILE, is_classifier, read_head
from .hub import resolve
from .load import load
from .peft import merged_state_dict, read_adapter_head
from .save import write_model

_WEIGHTS = (".safetensors", ".bin", ".index.json", ".pt", ".gguf")


def merge_adapter(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                  revision: str | None = None) -> Path:
    """Write the merged model of `base` (a folder, bundled model or hub name) and the adapter folder to
    `out`, in the base's dtype; a SEQ_CLS adapter gives a *ForSequenceClassification folder. Returns out."""
    folder, out = resolve(base, revision), Path(out)
    model = load(folder, Layout.parse("auto", plain=True), adapter=adapter)
    head, info = read_adapter_head(adapter) or (None, {})
    if isinstance(model, Classifier) and head is None:
        head = read_head(folder)[0] if is_classifier(folder) else \
            Head(None, tuple(f"LABEL_{i}" for i in range(model.score.out_features)), model.config.n_positions)
    info.pop("pad_token_id", None)  # already in the model's config
    write_model(merged_state_dict(model), model.config, out, head, **(info if head else {}))
    for f in sorted(folder.iterdir()):  # tokenizer, generation config, README...: everything but weights
        if f.is_file() and f.name != CONFIG_FILE and not f.name.endswith(_WEIGHTS):
            atomic_write(out / f.name, lambda p, f=f: shutil.copyfile(f, p))
    return out

"""load(folder, layout, device): every layout of both families and of classifiers, through the one path,
against transformers; and the memory it holds while loading (no float copy of the whole model)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from kogpt.api import KoGPT
from kogpt.core.classifier import Classifier
from kogpt.core.int8 import Int8Linear, fbgemm_available
from kogpt.core.layout import Layout
from kogpt.core.model import GPT
from kogpt.core.packed import PackedLinear, can_pack
from kogpt.errors import UserError
from kogpt.hf.load import load

no_fbgemm = pytest.mark.skipif(not fbgemm_available(), reason="no fbgemm")
LAYOUTS = ["fp32", "bf16", "fp16", "int8", pytest.param("int8-dynamic", marks=no_fbgemm)]
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.bfloat16,
         "int8-dynamic": torch.bfloat16}


def expected_linear(layout: str) -> type:
    if layout in ("int8", "int8-dynamic"):
        return Int8Linear
    return PackedLinear if can_pack("cpu", DTYPE[layout]) else nn.Linear


def assert_layout(model: nn.Module, layout: str) -> None:
    linears = [m for m in model.modules() if hasattr(m, "in_features")]
    assert linears and {type(m) for m in linears} == {expected_linear(layout)}
    if layout.startswith("int8"):
        assert {m.kernel for m in linears} == {"int8pack" if layout == "int8" else "fbgemm"}
    assert {p.dtype for p in model.parameters()} == {DTYPE[layout]}
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert not model.training


def assert_close_to(ours: torch.Tensor, theirs: torch.Tensor, layout: str) -> None:
    """fp32: parity (test_checkpoint's tolerance); half precision and int8: test_quantize's bounds."""
    ours = ours.float()
    if layout == "fp32":
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
        return
    assert ((ours - theirs).norm() / theirs.norm()).item() < 0.05
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() > 0.9


@pytest.fixture
def ids():
    return torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_every_layout_of_both_families_matches_transformers(hf_model, hf_dir, layout, ids, family):
    model = load(hf_dir, layout)
    assert isinstance(model, GPT)
    assert_layout(model, layout)
    if family == "gpt2" and layout == "fp32":  # plain layers tie the head to the embeddings' very Parameter
        assert model.lm_head.weight is model.wte.weight
    assert_close_to(model(ids), hf_model(ids).logits, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_a_classifier_folder_loads_through_the_same_function(hf_dir, layout, tmp_path):
    import transformers

    ids = torch.randint(0, 1000, (16, 16), generator=torch.Generator().manual_seed(5))  # 48 outputs to compare
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=3).eval()
    hf.score.weight.normal_(0.0, 0.5)  # a head that makes each position's state show
    hf.save_pretrained(tmp_path / "cls")
    model = load(tmp_path / "cls", layout)
    assert isinstance(model, Classifier) and model.gpt.lm_head is None and model.score.out_features == 3
    assert_layout(model, layout)
    theirs = hf(ids).logits
    ours = model(ids).float()
    if layout == "fp32":
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)  # test_finetune's parity tolerance
    else:  # three outputs: the relative error, not the argmax of near ties
        assert ((ours - theirs).norm() / theirs.norm()).item() < 0.05


def test_training_layout_is_plain_fp32_whatever_the_checkpoint(hf_model, tmp_path):
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path)
    assert load(tmp_path).wte.weight.dtype == torch.bfloat16  # "auto": the checkpoint's dtype
    model = load(tmp_path, Layout(torch.float32))
    assert {type(m) for m in model.modules() if hasattr(m, "in_features")} == {nn.Linear}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(p.requires_grad for p in model.parameters())


def test_layout_names_and_their_errors():
    assert Layout.parse("auto") == Layout(None, "packed") and Layout.parse(None) == Layout.parse("auto")
    assert Layout.parse("bfloat16") == Layout.parse(torch.bfloat16) == Layout(torch.bfloat16, "packed")
    assert Layout.parse("fp16", plain=True) == Layout(torch.float16, "plain")
    assert Layout.parse("int8") == Layout(torch.bfloat16, "int8")
    with pytest.raises(UserError, match="unknown dtype 'fp8'; choose one of auto, fp32, bf16, fp16, int8"):
        Layout.parse("fp8")
    with pytest.raises(UserError, match="not int8"):
        Layout.parse("int8-dynamic", plain=True)
    with pytest.raises(UserError, match="CPU only"):
        Layout.parse("int8-dynamic").resolve(torch.bfloat16, "cuda")
    assert Layout.parse("bf16").resolve(torch.float32, "cuda") == Layout(torch.bfloat16, "plain")  # oneDNN: CPU only
    assert Layout.parse("auto").resolve(torch.float32, "cpu") == Layout(torch.float32, "plain")


def test_a_classifier_folder_is_not_a_language_model(hf_dir, korean_tokenizer, tmp_path):
    import transformers

    transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=2).save_pretrained(tmp_path)
    korean_tokenizer.save(tmp_path)
    with pytest.raises(UserError, match="finetuned classifier: it has no language-model head to generate"):
        KoGPT.from_pretrained(tmp_path)
    from kogpt.hf.gguf import write_gguf

    with pytest.raises(UserError, match="finetuned classifier: it has no language-model head to export to GGUF"):
        write_gguf(tmp_path, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


_PEAK = """
import json, sys
import torch
from kogpt.hf.load import load
def status(key):  # kB
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
base = status("VmRSS:")
model = load(sys.argv[1], sys.argv[2])
peak = status("VmHWM:") - base
held = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
print(json.dumps({"peak_mb": peak / 1024, "model_mb": sum(held.values()) / 2**20}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fp32", "bf16", "int8"])
def test_peak_memory_of_a_load_is_the_model_plus_a_tensor(tmp_path_factory, layout):
    """A 134 MB fp32 GPT-2 (a 33 MB embedding) loads with a peak of about the loaded model: no second copy
    of the model in any layout (a float copy would add 100% for bf16, 130% for int8)."""
    folder = tmp_path_factory.getbasetemp() / "peak-model"
    if not (folder / "model.safetensors").exists():
        from kogpt.core.config import GPTConfig
        from kogpt.hf.convert import config_to_hf, name_map

        cfg = GPTConfig(family="gpt2", vocab_size=16000, n_positions=512, n_embd=512, n_layer=8, n_head=8)
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in GPT(cfg).named_parameters()}
        g = torch.Generator().manual_seed(0)
        tensors = {}
        for ours, (theirs, transpose) in name_map(cfg).items():
            t = torch.randn(shapes[ours], generator=g) * 0.02
            tensors[theirs[0]] = (t.t() if transpose else t).contiguous()
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config_to_hf(cfg, torch.float32)))
    r = subprocess.run([sys.executable, "-c", _PEAK, str(folder), layout], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    # headroom: one tensor in flight (the 33 MB embedding, and its transient fp32 copy for int8), allocator slack
    assert m["peak_mb"] < 1.15 * m["model_mb"] + 40, m

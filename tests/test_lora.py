"""LoRA in kogpt's own model (core/lora.py, built by the one loader) and PEFT-format adapters both ways
(hf/peft.py), proven against the real peft library on tiny random-init GPT-2 and GPT-J models."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kogpt.core.classifier import Classifier
from kogpt.core.layout import Layout
from kogpt.core.lora import MODULES, LoRAConfig, LoRALinear, lora_banks, lora_layers
from kogpt.errors import UserError
from kogpt.hf.folder import CheckpointError
from kogpt.hf.load import load
from kogpt.hf.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, write_adapter

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")
FP32 = Layout(torch.float32)
IDS = torch.randint(4, 1000, (2, 12), generator=torch.Generator().manual_seed(1))  # no pad id (3) inside


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-zero B (a fresh adapter changes nothing, so parity would prove nothing); a classifier's head
    scaled up from its 0.02 init so its logits are not all near zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if isinstance(model, Classifier):
            model.score.weight.mul_(50)
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.float() - b.float()).abs().max().item()
    print(f"max abs logit difference {d:.2e}")  # the number the report quotes (pytest -s)
    return d


# -- the layer -------------------------------------------------------------------------------------
def linear(W: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(W.size(1), W.size(0), bias=b is not None)
    with torch.no_grad():
        layer.weight.copy_(W)
        if b is not None:
            layer.bias.copy_(b)
    return layer


def test_lora_linear_is_peft_math():
    torch.manual_seed(0)
    W, b, x = torch.randn(12, 8), torch.randn(12), torch.randn(3, 5, 8)
    cfg = LoRAConfig(r=2, alpha=6.0)
    layer = LoRALinear(linear(W, b), cfg)
    assert torch.equal(layer(x), F.linear(x, W, b))  # B starts at zero: a new adapter changes nothing
    bound = 1 / math.sqrt(8)  # kaiming_uniform(a=sqrt(5)) on fan_in 8, as peft and nn.Linear init
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad and layer.lora_B.requires_grad
    with torch.no_grad():
        layer.lora_B.normal_()
    A, B = layer.lora_A, layer.lora_B[0]
    want = F.linear(x, W, b) + (x @ A.T @ B.T) * 3.0  # base(x) + B(A(x)) * alpha / r
    torch.testing.assert_close(layer(x), want)
    torch.testing.assert_close(F.linear(x, layer.merged_weight(), b), want)


def test_grouped_slices_adapt_only_their_rows():
    """GPT-J's fused qkv with q and v adapted: three row blocks, the k block untouched."""
    torch.manual_seed(0)
    W, x = torch.randn(12, 8), torch.randn(4, 8)
    layer = LoRALinear(linear(W, None), LoRAConfig(r=2, alpha=2.0), groups=3, slices=(0, 2))
    with torch.no_grad():
        layer.lora_B.normal_()
    A = layer.lora_A.view(2, 2, 8)
    y = layer(x)
    torch.testing.assert_close(y[:, :4], x @ W[:4].T + x @ A[0].T @ layer.lora_B[0].T)
    torch.testing.assert_close(y[:, 4:8], x @ W[4:8].T)
    torch.testing.assert_close(y[:, 8:], x @ W[8:].T + x @ A[1].T @ layer.lora_B[1].T)
    torch.testing.assert_close(F.linear(x, layer.merged_weight()), y)


def test_targets():
    assert LoRAConfig.parse("").targets == MODULES
    assert LoRAConfig.parse("attn").targets == ("attn.proj", "attn.qkv")
    assert LoRAConfig.parse("qkv,proj").targets == ("attn.proj", "attn.qkv", "mlp.proj")
    assert LoRAConfig.parse("mlp.fc, q,v").targets == ("attn.q", "attn.v", "mlp.fc")
    assert LoRAConfig.parse("q,qkv").targets == ("attn.qkv",)
    for bad in ("lm_head", "attn,wte"):
        with pytest.raises(UserError, match="--lora-targets"):
            LoRAConfig.parse(bad)
    with pytest.raises(UserError, match="--lora-r"):
        LoRAConfig.parse("attn", r=0)
    with pytest.raises(UserError, match="--lora-dropout"):
        LoRAConfig.parse("attn", dropout=1.0)
    with pytest.raises(UserError, match="GPT-2"):
        LoRAConfig.parse("q").adapts("h.0.attn.qkv", "gpt2")
    assert LoRAConfig.parse("q,v").adapts("h.0.attn.qkv", "gptj") == (3, (0, 2))
    assert LoRAConfig.parse("attn").adapts("h.1.attn.qkv", "gpt2") == (1, (0,))
    assert LoRAConfig.parse("attn").adapts("gpt.h.1.mlp.fc", "gptj") is None


def test_loader_builds_lora_layers(hf_dir, family):
    plain = load(hf_dir, FP32)
    model = load(hf_dir, Layout(torch.float32, lora=LoRAConfig.parse("qkv,mlp.fc", r=4)))
    assert sorted(lora_layers(model)) == [f"h.{i}.{m}" for i in range(2) for m in ("attn.qkv", "mlp.fc")]
    assert type(model.h[0].attn.proj) is nn.Linear
    assert model.h[0].attn.qkv.groups == (3 if family == "gptj" else 1)
    assert torch.equal(model(IDS), plain(IDS))  # B is zero
    bf16 = load(hf_dir, Layout(torch.bfloat16, lora=LoRAConfig(r=4)))  # frozen bf16 base, fp32 adapters
    qkv = bf16.h[0].attn.qkv
    assert qkv.weight.dtype == torch.bfloat16 and not qkv.weight.requires_grad
    assert qkv.lora_A.dtype == qkv.lora_B.dtype == torch.float32
    assert bf16(IDS).dtype == torch.bfloat16


# -- PEFT format, both ways ------------------------------------------------------------------------
def test_peft_loads_kogpt_adapter(hf_dir, family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load(hf_dir, Layout(torch.float32, lora=LoRAConfig(r=4, alpha=8.0)))
    randomize(model)
    write_adapter(model, tmp_path / "adapter", base=str(hf_dir))
    hf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = model(IDS), hf(IDS).logits
        assert max_diff(ours, load(hf_dir, FP32)(IDS)) > 1e-2  # the adapter matters
    assert max_diff(ours, theirs) < 1e-4
    again = load(hf_dir, FP32, adapter=tmp_path / "adapter")  # and kogpt reads back what it wrote
    assert torch.equal(again(IDS), ours)


PEFT_TARGETS = {"gpt2": ["attn.c_attn", "mlp.c_proj"], "gptj": ["q_proj", "v_proj", "out_proj", "fc_in"]}


def test_kogpt_loads_peft_adapter(hf_model, hf_dir, family, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=PEFT_TARGETS[family],
                          fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM")
    hf = peft.get_peft_model(hf_model, cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    hf.save_pretrained(tmp_path / "adapter")
    model = load(hf_dir, FP32, adapter=tmp_path / "adapter")
    want = {"gpt2": ["attn.qkv", "mlp.proj"], "gptj": ["attn.proj", "attn.qkv", "mlp.fc"]}[family]
    assert sorted({n.split(".", 2)[2] for n in lora_banks(model)}) == want
    if family == "gptj":  # q and v of the fused qkv: its k block gets no update
        B = model.h[0].attn.qkv.Bt.t()
        assert B[64:128].abs().max() == 0 and B[:64].abs().max() > 0 and B[128:].abs().max() > 0
    with torch.no_grad():
        assert max_diff(model(IDS), hf.eval()(IDS).logits) < 1e-4


def test_sequence_classifier_adapter_both_ways(hf_dir, family, tmp_path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    clf = Classifier(load(hf_dir, Layout(torch.float32, lora=LoRAConfig.parse("attn", r=2))), 3)
    randomize(clf)
    write_adapter(clf, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["modules_to_save"] == ["score"]
    ids = IDS.clone()
    ids[0, -3:] = 3  # right padding: the head reads the last non-pad token
    base = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=3)
    hf = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = clf.eval()(ids)
        plain = Classifier(load(hf_dir, FP32), 3).eval()
        plain.score.weight.copy_(clf.score.weight)
        assert max_diff(ours, plain(ids)) > 1e-2  # the adapter matters
        assert max_diff(ours, hf(ids).logits) < 1e-4
        again = load(hf_dir, FP32, adapter=tmp_path / "adapter")
        assert isinstance(again, Classifier) and torch.equal(again(ids), ours)


def test_bad_adapter_folders(hf_dir, family, tmp_path):
    model = load(hf_dir, Layout(torch.float32, lora=LoRAConfig(r=4)))
    good = tmp_path / "good"
    write_adapter(model, good)
    cases = {}
    for name in ("no_weights", "wrong_r", "other_family", "deeper"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ADAPTER_CONFIG).write_text((good / ADAPTER_CONFIG).read_text())
        if name != "no_weights":
            (tmp_path / name / ADAPTER_WEIGHTS).write_bytes((good / ADAPTER_WEIGHTS).read_bytes())
    cases["no_weights"] = ADAPTER_WEIGHTS
    cfg = json.loads((good / ADAPTER_CONFIG).read_text())
    (tmp_path / "wrong_r" / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "r": 8}))
    cases["wrong_r"] = r"has shape \(4, .*; r=8 \(adapter_config.json\) on this base needs \(8, "
    from safetensors.torch import load_file, save_file  # an adapter with a block (or a module) the base lacks
    sd = load_file(good / ADAPTER_WEIGHTS)
    other = "c_attn" if family == "gptj" else "q_proj"
    save_file({k.replace("attn.out_proj" if family == "gptj" else "attn.c_attn", f"attn.{other}"): v
               for k, v in sd.items()}, tmp_path / "other_family" / ADAPTER_WEIGHTS)
    cases["other_family"] = "base model does not have"
    save_file({**sd, **{k.replace("h.1.", "h.2."): v.clone() for k, v in sd.items()}}, tmp_path / "deeper" / ADAPTER_WEIGHTS)
    cases["deeper"] = "base model does not have"
    cases["missing"] = "adapter_config.json"
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as e:
            load(hf_dir, FP32, adapter=tmp_path / name)
        assert "\n" not in str(e.value)

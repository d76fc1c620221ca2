"""`kogpt merge`: base + PEFT adapter → a plain HF folder that transformers loads with the logits peft gives
for base + adapter (both families; a SEQ_CLS adapter gives a sequence classifier)."""

from __future__ import annotations

import pytest
import torch

from kogpt.cli import main
from kogpt.core.classifier import Classifier
from kogpt.core.layout import Layout
from kogpt.core.lora import LoRAConfig
from kogpt.hf.load import load
from kogpt.hf.peft import write_adapter
from test_lora import IDS, max_diff, randomize

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("classifier", [False, True], ids=["lm", "seq-cls"])
def test_merge_equals_base_plus_adapter_in_peft(model_dir, family, classifier, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = load(model_dir, Layout(torch.float32, lora=LoRAConfig.parse("attn,mlp", r=4, alpha=8)))
    model = Classifier(model, 3) if classifier else model
    randomize(model)
    write_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    auto, kw = (AutoModelForSequenceClassification, {"num_labels": 3}) if classifier else (AutoModelForCausalLM, {})
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(auto.from_pretrained(model_dir, **kw), tmp_path / "adapter").eval()
        want = want(IDS).logits
        merged = auto.from_pretrained(out).eval()
        assert type(merged).__name__.endswith("ForSequenceClassification") == classifier
        assert max_diff(merged(IDS).logits, want) < 1e-4
        assert max_diff(load(out, "fp32")(IDS), want) < 1e-4  # kogpt reads the merged folder too
    assert not any(n.startswith("adapter") for n in (p.name for p in out.iterdir()))
    assert AutoTokenizer.from_pretrained(out)("안녕하세요")["input_ids"]


def test_merge_bad_adapter_is_one_line(model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "adapter_config.json" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()

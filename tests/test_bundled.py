"""The bundled model (kogpt/models/kogpt-mini): shipped, the default --model, offline, and Korean."""

from __future__ import annotations

import json
import lzma
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import torch

from kogpt.data.chats import read_conversations
from kogpt.evaluation.tasks.base import split_examples
from kogpt.hf.folder import load_config
from kogpt.hf.hub import BUNDLED, bundled_models
from kogpt.hf.load import load
from kogpt.hf.peft import read_adapter
from kogpt.core.config import GPTConfig
from kogpt.core.lora import MODULES
from kogpt.text.chat import ChatTemplate
from kogpt.text.tokenizer import Tokenizer
from kogpt.training.sft import SPLIT_SEED

ROOT = Path(__file__).resolve().parents[1]
MINI = BUNDLED / "kogpt-mini"
CHAT = BUNDLED / "kogpt-mini-chat"  # a LoRA adapter on kogpt-mini (its README.md: how it was trained)
LITERATURE = ROOT.parent / "shared" / "data" / "corpus" / "literature"
CHATBOT = ROOT.parent / "shared" / "data" / "corpus" / "chatbot" / "ChatbotData.csv"  # kogpt-mini-chat's training file
OFFLINE = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_PROXY="*",
               HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")  # any network use fails


def hangul_share(text: str) -> float:
    """Share of Korean letters among the letters of `text`: Hangul syllables and the compatibility jamo that
    Korean reviews write alone (ㅋㅋㅋ, ㅠㅠ)."""
    letters = [c for c in text if c.isalpha()]
    return sum("\uac00" <= c <= "\ud7a3" or "\u3131" <= c <= "\u318e" for c in letters) / max(1, len(letters))


def test_kogpt_mini_is_shipped_within_budget():
    assert "kogpt-mini" in bundled_models()
    weights = MINI / "model.safetensors"
    assert weights.stat().st_size <= 40e6  # the issue's ~40 MB budget
    assert load_config(MINI) == GPTConfig.preset("kogpt-mini")
    for name in ("tokenizer.json", "generation_config.json", "README.md", "train.toml"):
        assert (MINI / name).is_file(), name


def test_default_model_generates_korean_offline():
    r = subprocess.run([sys.executable, "-m", "kogpt", "generate", "--prompt", "오늘 날씨가 좋아서", "--seed", "1",
                        "--max-new-tokens", "40"], capture_output=True, text=True, env=OFFLINE, timeout=120)
    assert r.returncode == 0, r.stderr
    new = r.stdout.split("오늘 날씨가 좋아서", 1)[1]
    assert len(new.strip()) >= 10 and hangul_share(new) > 0.8 and " " in new.strip()


def test_python_m_kogpt_opens_the_prompt_on_the_bundled_model():
    child = pexpect.spawn(sys.executable, ["-m", "kogpt"], env=OFFLINE, encoding="utf-8", timeout=90,
                          dimensions=(50, 400))
    child.expect_exact("prompt> ")
    child.sendline("이 영화는 정말")
    child.expect_exact("temperature")
    child.sendline("")
    child.expect_exact("max_length")
    child.sendline("32")
    child.expect_exact("prompt> ")
    answer = child.before.rsplit("이 영화는 정말", 1)[1]  # sampled, unseeded: may end early at </s> (a short review)
    assert hangul_share(answer) > 0.8 and len(re.findall(r"[가-힣]", answer)) >= 2
    child.sendeof()
    child.expect(pexpect.EOF)


def test_bundled_model_compresses_unseen_korean_better_than_xz(tmp_path):
    """The literature source (one 1936 short story) is held out whole by prepare: never trained on."""
    if not LITERATURE.is_dir():
        pytest.skip("../shared/data/corpus is not beside the repository")
    story = "\n".join(p.read_text(encoding="utf-8") for p in sorted(LITERATURE.iterdir()) if p.suffix == ".txt")
    text = tmp_path / "story.txt"
    text.write_text(story[:4000], encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "kogpt", "eval", "--task", "perplexity", "--data", str(text),
                        "--output", str(tmp_path / "r.json")], capture_output=True, text=True, env=OFFLINE,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    bpb = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["metrics"]["bits_per_byte"]
    xz = 8 * len(lzma.compress(text.read_bytes(), preset=9 | lzma.PRESET_EXTREME)) / len(text.read_bytes())
    assert bpb < xz, (bpb, xz)


def test_kogpt_mini_chat_is_a_peft_lora_adapter_for_kogpt_mini():
    config = json.loads((CHAT / "adapter_config.json").read_text(encoding="utf-8"))
    assert (config["peft_type"], config["task_type"], config["base_model_name_or_path"]) == ("LORA", "CAUSAL_LM",
                                                                                          "kogpt-mini")
    adapter = read_adapter(CHAT, load_config(MINI))
    assert adapter.lora.r == 16 and adapter.lora.alpha == 32
    assert set(adapter.lora.targets) == set(MODULES) and not adapter.classifier and not adapter.replaced
    assert len(adapter.pairs) == load_config(MINI).n_layer * len(MODULES)
    assert (CHAT / "adapter_model.safetensors").stat().st_size <= 5e6  # a few MB inside the package
    assert (CHAT / "README.md").is_file()
    assert "kogpt-mini-chat" in bundled_models()  # by name: --adapter kogpt-mini-chat


def answer_loss(model, conversations, tok) -> float:
    """Mean NLL of the tokens the chat template marks as the model's (the replies and their EOS), all
    conversations right-padded into one batch (causal: padding after a token does not change its logits)."""
    encoded = [ChatTemplate.default().encode(c.messages, tok) for c in conversations]
    T = max(len(ids) for ids, _ in encoded)
    x = torch.tensor([ids + [tok.pad_id or 0] * (T - len(ids)) for ids, _ in encoded])  # (B, T)
    keep = torch.tensor([mask[1:] + [False] * (T - len(mask)) for _, mask in encoded])  # (B, T-1)
    with torch.inference_mode():
        logp = model(x[:, :-1]).float().log_softmax(-1)  # (B, T-1, V)
    return -logp.gather(-1, x[:, 1:, None])[..., 0][keep].mean().item()


def test_kogpt_mini_chat_answers_held_out_conversations_better_than_the_base():
    if not CHATBOT.is_file():
        pytest.skip("../shared/data/corpus is not beside the repository")
    conversations, _ = read_conversations(CHATBOT)
    # kogpt sft's validation split (--val-fraction 0.05, no --val; same seeded permutation, same count): not trained on
    _, held_out = split_examples(conversations, 0.05, SPLIT_SEED)
    held_out = held_out[:16]
    tok = Tokenizer.from_dir(MINI)
    base = answer_loss(load(MINI, "fp32"), held_out, tok)
    chat = answer_loss(load(MINI, "fp32", adapter=CHAT), held_out, tok)
    assert chat < base, (chat, base)

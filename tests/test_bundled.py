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

from kogpt.hf.folder import load_config
from kogpt.hf.hub import BUNDLED, bundled_models
from kogpt.core.config import GPTConfig

ROOT = Path(__file__).resolve().parents[1]
MINI = BUNDLED / "kogpt-mini"
LITERATURE = ROOT.parent / "shared" / "data" / "corpus" / "literature"
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

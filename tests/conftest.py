"""Shared fixtures: tiny random-init transformers models of both families, saved HF folders, paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test when the shared folder is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A random-init transformers GPT2LMHeadModel / GPTJForCausalLM with a tiny config, eval mode.

    initializer_range is larger than the default so attention patterns and rotary phases matter
    to the logits (a wrong rotary convention must show up well above the parity tolerance).
    """
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=1000, n_positions=128, n_layer=2, initializer_range=0.3,
                  bos_token_id=1, eos_token_id=1, pad_token_id=3)  # kogpt tokenizer: </s>=1, <pad>=3
    common.update(overrides)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_head=4, **common)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        common.setdefault("rotary_dim", 8)
        cfg = transformers.GPTJConfig(n_embd=64, n_head=4, **common)
        model = transformers.GPTJForCausalLM(cfg)
    # give LayerNorms and biases non-trivial values: the defaults (1, 0) would hide swapped tensors
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from more threads, and OpenMP threads spin-wait on a shared machine.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["gpt2", "gptj"])
def family(request) -> str:
    return request.param


@pytest.fixture
def hf_model(family):
    return make_hf_model(family)


@pytest.fixture
def hf_dir(hf_model, tmp_path) -> Path:
    """The tiny transformers model saved with save_pretrained (safetensors)."""
    d = tmp_path / "hf"
    hf_model.save_pretrained(d)
    return d


KOREAN_LINES = [
    "안녕하세요. 한국어 GPT 모델입니다.", "오늘 날씨가 정말 좋네요 ㅋㅋㅋ", "대한민국의 수도는 서울이다.",
    "이 영화 진짜 재밌어요! 😀", "한국어 자연어 처리는 어렵지만 재미있습니다.", "김유정의 동백꽃을 읽었다.",
    "법률 제1조(목적) 이 법은 국민의 권리를 보호함을 목적으로 한다.", "커피 한 잔 하실래요?",
]


@pytest.fixture(scope="session")
def korean_tokenizer(tmp_path_factory):
    """A small kogpt BPE (vocab 1000, fits the tiny models) trained on real Korean lines."""
    from kogpt.text.bpe import train_tokenizer

    lines = list(KOREAN_LINES) * 3
    wiki = SHARED / "corpus" / "kowiki" / "kowiki_sample.txt"
    if wiki.exists():
        with open(wiki, encoding="utf-8") as f:
            lines += [line.strip() for _, line in zip(range(400), f) if line.strip()]
    path = tmp_path_factory.mktemp("tok") / "lines.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return train_tokenizer([path], vocab_size=1000, show_progress=False)


@pytest.fixture
def model_dir(hf_dir, korean_tokenizer) -> Path:
    """A transformers save_pretrained folder plus a kogpt tokenizer: what a user would point kogpt at."""
    korean_tokenizer.save(hf_dir)
    return hf_dir

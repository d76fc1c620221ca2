"""KoGPT, the Python API: loading, text generation equal to transformers, streaming, stop strings, scoring."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from kogpt.api import KoGPT
from kogpt.errors import UserError

PROMPT = "안녕하세요"


@pytest.fixture
def gpt(model_dir):
    return KoGPT.from_pretrained(model_dir, device="cpu")


def hf_greedy(hf_model, ids, n, **kw):
    out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            do_sample=False, max_new_tokens=n, pad_token_id=3, eos_token_id=1, **kw)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kw", [{}, {"repetition_penalty": 2.0}], ids=["greedy", "rep2"])
def test_text_generation_matches_transformers(gpt, hf_model, kw):
    ids = gpt.tokenizer.encode(PROMPT)
    expected = hf_greedy(hf_model, ids, 24, **kw)
    [c] = gpt.complete([PROMPT], greedy=True, max_new_tokens=24, **kw)
    assert c.token_ids == [t for t in expected if t != 1]
    full = gpt.tokenizer.decode(ids + c.token_ids, skip_special_tokens=True)
    assert PROMPT + c.text == full  # the continuation keeps the space a word-initial ▁ stands for
    assert gpt.generate(PROMPT, greedy=True, max_new_tokens=24, **kw) == c.text


def test_family_recipe_is_the_default_without_generation_config(tmp_path, korean_tokenizer, family):
    from conftest import make_hf_model

    make_hf_model(family, n_positions=256).save_pretrained(tmp_path)  # room past max_length 128
    korean_tokenizer.save(tmp_path)
    (tmp_path / "generation_config.json").unlink()  # as skt/kogpt2-base-v2 and kakaobrain/kogpt ship
    gpt = KoGPT.from_pretrained(tmp_path)
    s = gpt.defaults.sampling
    if family == "gpt2":  # KoGPT2 card: greedy, repetition_penalty 2.0, max_length 128
        assert (s.do_sample, s.repetition_penalty, gpt.defaults.max_length) == (False, 2.0, 128)
    else:  # KoGPT card: sampling, temperature 0.8, max_length 128
        assert (s.do_sample, s.temperature, gpt.defaults.max_length) == (True, 0.8, 128)
    [c] = gpt.complete([PROMPT], seed=0, bad_words_ids=[[gpt.tokenizer.eos_id]])  # run to the length limit
    assert len(gpt.tokenizer.encode(PROMPT)) + len(c.token_ids) == 128 and c.finish_reason == "length"
    long = "가나다라 " * 40  # longer than max_length, shorter than the context: nothing to generate, no error
    assert 128 < len(gpt.tokenizer.encode(long)) < 256
    [c] = gpt.complete([long])
    assert c.token_ids == [] and c.finish_reason == "length"


def test_stream_pieces_join_to_the_text_and_never_split(gpt):
    opts = dict(temperature=1.0, top_k=0, max_new_tokens=40, seed=5)
    pieces = list(gpt.stream(PROMPT, **opts))
    assert "".join(pieces) == gpt.generate(PROMPT, **opts)
    assert len(pieces) > 1
    # a random model emits stray byte pieces; a held-back partial character never ends a piece early
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_stop_strings_cut_the_text(gpt):
    full = gpt.generate(PROMPT, greedy=True, max_new_tokens=30)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop and stop in full
    [c] = gpt.complete([PROMPT], greedy=True, max_new_tokens=30, stop=[stop])
    assert c.text == full[: full.index(stop)] and c.finish_reason == "stop"
    streamed = "".join(gpt.stream(PROMPT, greedy=True, max_new_tokens=30, stop=[stop]))
    assert streamed == c.text


def test_batches_return_sequences_and_seeds(gpt):
    prompts = [PROMPT, "오늘 날씨가", "대한민국"]
    batched = gpt.generate(prompts, greedy=True, max_new_tokens=10, batch_size=2)
    assert batched == [gpt.generate(p, greedy=True, max_new_tokens=10) for p in prompts]
    many = gpt.generate(PROMPT, temperature=1.0, max_new_tokens=10, num_return_sequences=3, seed=1)
    assert len(many) == 3 and len(set(many)) > 1
    assert many == gpt.generate(PROMPT, temperature=1.0, max_new_tokens=10, num_return_sequences=3, seed=1)


def test_score_equals_transformers_log_likelihood(gpt, hf_model):
    text = "한국어 모델의 점수"
    ids = [1] + gpt.tokenizer.encode(text)  # BOS </s> then the text
    with torch.no_grad():
        logp = hf_model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    expected = logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert gpt.score(text) == pytest.approx(expected, abs=1e-3)


def test_save_pretrained_round_trip_with_generation_config(gpt, tmp_path):
    gpt.defaults = type(gpt.defaults)(gpt.defaults.sampling.replace(top_k=7, do_sample=True), max_length=50)
    gpt.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    again = KoGPT.from_pretrained(tmp_path)
    assert again.defaults == gpt.defaults
    assert again.generate(PROMPT, greedy=True, max_new_tokens=8) == gpt.generate(PROMPT, greedy=True, max_new_tokens=8)
    import transformers

    hf_gen = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (hf_gen.top_k, hf_gen.max_length, hf_gen.do_sample) == (7, 50, True)


def test_config_and_tokenizer_disagreeing_warns_once_and_uses_the_tokenizer(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["eos_token_id"] = cfg["bos_token_id"] = 999
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        gpt = KoGPT.from_pretrained(model_dir)
    msgs = [str(x.message) for x in w if "tokenizer" in str(x.message)]
    assert len(msgs) == 1 and "eos_token_id 999" in msgs[0]
    assert gpt.tokenizer.eos_id == 1


def test_bad_options_are_user_errors(gpt):
    with pytest.raises(UserError, match="temperature"):
        gpt.generate(PROMPT, temperature=-1)
    with pytest.raises(UserError, match="unknown generation option"):
        gpt.generate(PROMPT, temprature=0.5)
    with pytest.raises(UserError, match="max_new_tokens"):
        gpt.generate(PROMPT, max_new_tokens=0)


def test_continuation_keeps_the_space_after_the_prompt(gpt):
    """A continuation starting with a word-initial ▁ token begins with a space."""
    tok = gpt.tokenizer
    word = next(i for i in range(tok.vocab_size) if (tok.id_to_token(i) or "").startswith("\u2581")
                and len(tok.id_to_token(i)) > 1)
    [c] = gpt.complete([PROMPT], greedy=True, max_new_tokens=1, bad_words_ids=[[i] for i in range(1000) if i != word])
    assert c.token_ids == [word] and c.text == " " + tok.id_to_token(word)[1:]
    assert "".join(gpt.stream(PROMPT, greedy=True, max_new_tokens=1,
                              bad_words_ids=[[i] for i in range(1000) if i != word])) == c.text

"""Parity of kogpt's GPT with transformers' GPT2LMHeadModel and GPTJForCausalLM (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_hf_model

from kogpt.hf.load import load
from kogpt.core.config import GPTConfig
from kogpt.core.kv_cache import Cache, KVCache
from kogpt.core.model import GPT, apply_rope

ATOL = 1e-4


def cached_logits(model, ids, n_prefill):
    """Logits of prefill(ids[:, :n_prefill]) followed by one cached step per remaining token."""
    cache = KVCache.for_model(model.config, ids.size(0), ids.size(1))
    out = [model(ids[:, :n_prefill], cache)]
    for t in range(n_prefill, ids.size(1)):
        out.append(model(ids[:, t:t + 1], cache))
    return torch.cat(out, 1)


def greedy(model, ids, n):
    cache = KVCache.for_model(model.config, ids.size(0), ids.size(1) + n)
    logits = model(ids, cache, last_only=True)
    out = ids
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], 1)
        logits = model(nxt, cache)
    return out


@pytest.fixture
def ids():
    return torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_full_forward_matches_transformers(hf_model, hf_dir, ids):
    ours = load(hf_dir)
    expected = hf_model(ids).logits
    torch.testing.assert_close(ours(ids), expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_cached_decoding_matches_transformers(hf_model, hf_dir, ids):
    ours = load(hf_dir)
    expected = hf_model(ids).logits
    torch.testing.assert_close(cached_logits(ours, ids, 7), expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_greedy_tokens_match_transformers_generate(hf_model, hf_dir):
    prompt = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(2))
    expected = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=32, min_new_tokens=32, pad_token_id=3)
    got = greedy(load(hf_dir), prompt, 32)
    assert got.tolist() == expected.tolist()
    assert len(set(got[0, 8:].tolist())) > 1  # a degenerate single-token loop would prove little


@torch.no_grad()
def test_rows_of_different_lengths_share_one_cache(hf_dir):
    """Rows at different lengths in one batch give each row's own logits (no padding involved)."""
    model = load(hf_dir)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 1000, (n,), generator=g) for n in (5, 9, 2)]
    cache = KVCache.for_model(model.config, 3, 16)
    last = [model(r[None], cache, slice(b, b + 1), last_only=True)[0, -1] for b, r in enumerate(rows)]
    assert cache.lengths.tolist() == [5, 9, 2]
    steps = torch.tensor([[11, 13], [12, 14], [15, 16]])
    out = model(steps, cache)  # two new tokens per row, each row at its own position
    assert cache.lengths.tolist() == [7, 11, 4]
    for b, r in enumerate(rows):
        alone = model(torch.cat([r, steps[b]])[None])[0]
        torch.testing.assert_close(last[b], alone[len(r) - 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(out[b], alone[len(r):], atol=ATOL, rtol=0)
    cache.reset(slice(1, 2))  # a freed row takes a new sequence
    again = model(rows[2][None], cache, slice(1, 2))[0]
    torch.testing.assert_close(again, model(rows[2][None])[0], atol=ATOL, rtol=0)


def test_every_cache_the_model_is_given_declares_the_cache_protocol():
    from kogpt.generation.compiled_step import _StaticCache
    from kogpt.generation.steering import _PerturbedPast

    kv, lengths = torch.zeros(1, 1, 1, 4, 2), torch.zeros(1, dtype=torch.long)  # (n_layer, B, nh, S, hs), (B,)
    for cache in (KVCache(1, 1, 1, 4, 2), _StaticCache(kv, kv, lengths), _PerturbedPast(kv, kv)):
        assert isinstance(cache, Cache)
    assert not isinstance(object(), Cache)


def test_half_rotation_is_not_gptj():
    """GPT-J rotates interleaved pairs; the half-split (GPT-NeoX) convention gives other numbers."""
    x = torch.randn(1, 1, 3, 8)
    cos, sin = torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2)
    out = apply_rope(x, cos, sin, 4)
    # pair (0, 1) rotates together
    torch.testing.assert_close(out[..., 0], x[..., 0] * cos[..., 0] - x[..., 1] * sin[..., 0])
    torch.testing.assert_close(out[..., 1], x[..., 1] * cos[..., 0] + x[..., 0] * sin[..., 0])
    torch.testing.assert_close(out[..., 4:], x[..., 4:])  # dims past rotary_dim pass through


def test_presets_have_the_model_card_shapes():
    base = GPTConfig.preset("kogpt2-base-v2")
    assert (base.n_layer, base.n_head, base.n_embd, base.n_positions, base.vocab_size) == (12, 12, 768, 1024, 51200)
    assert base.tie_word_embeddings and base.family == "gpt2"
    assert 124e6 < base.num_params() < 126e6  # "125M"
    j = GPTConfig.preset("kogpt-6b")
    assert (j.n_layer, j.n_embd, j.n_head, j.head_dim, j.rope_dim, j.vocab_size) == (28, 4096, 16, 256, 64, 64512)
    assert 6.0e9 < j.num_params() < 6.3e9
    assert GPTConfig.preset("kogpt2-1.5b").n_layer == 48
    mini = GPTConfig.preset("kogpt-mini")  # the bundled model: at most ~40 MB in bf16
    assert 2 * mini.num_params() <= 40e6 and mini.n_positions == 1024 and mini.vocab_size == 24576
    with pytest.raises(KeyError, match="unknown preset"):
        GPTConfig.preset("nope")


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gptj", "tiny", "kogpt-mini"])
def test_num_params_counts_the_module(name):
    cfg = GPTConfig.preset(name)
    model = GPT(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="rotary_dim"):
        GPTConfig(family="gptj", n_embd=32, n_head=4, rotary_dim=9)
    with pytest.raises(ValueError, match="family"):
        GPTConfig(family="llama")


def test_dropout_acts_only_in_train_mode(hf_dir, ids):
    plain, ours = load(hf_dir), load(hf_dir)
    ours.set_dropout(0.3)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), plain(ids), atol=0, rtol=0)
        ours.train()
        first, second = ours(ids), ours(ids)
    assert (first - second).abs().max() > 1e-3  # a fresh mask per call
    ours.set_dropout(0.0)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), plain(ids), atol=0, rtol=0)


def test_gpt2_dropout_matches_transformers_in_train_mode(tmp_path, ids):
    """Same rate on embeddings, attention weights and both residual branches, drawn in transformers' order."""
    hf = make_hf_model("gpt2", resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2, attn_implementation="sdpa")
    hf.save_pretrained(tmp_path)
    ours = load(tmp_path)
    ours.set_dropout(0.2)
    torch.manual_seed(5)
    expected = hf.train()(ids).logits
    torch.manual_seed(5)
    got = ours.train()(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.manual_seed(6)
    assert (ours(ids) - expected).abs().max() > 1e-2  # another seed, other masks

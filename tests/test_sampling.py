"""Each logits processor equals the corresponding transformers processor on random logits."""

from __future__ import annotations

import pytest
import torch
import transformers.generation.logits_process as hf

from kogpt.generation import sampling as S
from kogpt.errors import UserError


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 50, generator=g) * 3


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (4, 30), generator=g)


CASES = [
    (lambda l, i: S.temperature(l, i, 0.7), hf.TemperatureLogitsWarper(0.7)),
    (lambda l, i: S.top_k(l, i, 5), hf.TopKLogitsWarper(5)),
    (lambda l, i: S.top_p(l, i, 0.8), hf.TopPLogitsWarper(0.8)),
    (lambda l, i: S.top_p(l, i, 0.01), hf.TopPLogitsWarper(0.01)),
    (lambda l, i: S.min_p(l, i, 0.1), hf.MinPLogitsWarper(0.1)),
    (lambda l, i: S.typical_p(l, i, 0.7), hf.TypicalLogitsWarper(0.7)),
    (lambda l, i: S.repetition_penalty(l, i, 2.0), hf.RepetitionPenaltyLogitsProcessor(2.0)),
    (lambda l, i: S.repetition_penalty(l, i, 0.8), hf.RepetitionPenaltyLogitsProcessor(0.8)),
    (lambda l, i: S.no_repeat_ngram(l, i, 2), hf.NoRepeatNGramLogitsProcessor(2)),
    (lambda l, i: S.no_repeat_ngram(l, i, 3), hf.NoRepeatNGramLogitsProcessor(3)),
]


@pytest.mark.parametrize("ours,theirs", CASES)
def test_processor_matches_transformers(ours, theirs, logits, ids):
    before = logits.clone(), ids.clone()
    got = ours(logits, ids)
    torch.testing.assert_close(got, theirs(ids, logits.clone()))
    assert torch.equal(logits, before[0]) and torch.equal(ids, before[1])  # inputs untouched
    assert torch.isfinite(got).any(-1).all()  # every row keeps at least one token


def test_no_repeat_ngram_bans_on_repeated_context():
    """A sequence built to repeat: the ngram processors ban something, identically."""
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    logits = torch.zeros(1, 10)
    got = S.no_repeat_ngram(logits, ids, 3)
    assert got[0, 7] == float("-inf")
    torch.testing.assert_close(got, hf.NoRepeatNGramLogitsProcessor(3)(ids, logits.clone()))


def test_bad_words_matches_transformers(logits, ids):
    words = ((3,), (ids[0, -1].item(), 9), (ids[1, -2].item(), ids[1, -1].item(), 11), (1, 2, 3, 4))
    got = S.bad_words(logits, ids, words)
    theirs = hf.NoBadWordsLogitsProcessor([list(w) for w in words])(ids, logits.clone())
    torch.testing.assert_close(got, theirs)
    assert got[0, 9] == float("-inf") and got[1, 11] == float("-inf") and (got[:, 3] == float("-inf")).all()


def test_padding_ids_are_ignored(logits):
    V = logits.size(-1)
    ids = torch.tensor([[V, V, 4]])
    got = S.repetition_penalty(logits[:1], ids, 2.0)
    assert torch.equal(got[0, :4], logits[0, :4]) and torch.equal(got[0, 5:], logits[0, 5:])


def test_greedy_is_argmax_after_penalties(logits, ids):
    s = S.SamplingConfig(do_sample=False, repetition_penalty=2.0)
    expected = hf.RepetitionPenaltyLogitsProcessor(2.0)(ids, logits.clone()).argmax(-1)
    assert torch.equal(S.sample(logits, ids, s), expected)
    assert not S.SamplingConfig(temperature=0).do_sample  # temperature 0 means greedy


def test_greedy_breaks_ties_to_the_first_id_as_argmax_does():
    logits = torch.zeros(3, 51200)
    logits[0, [7, 40000]] = 5.0  # a tie: the lower id wins, as argmax (and transformers' greedy) picks it
    logits[1, [51199, 3]] = 2.0
    logits[2] = torch.randn(51200, generator=torch.Generator().manual_seed(0))
    picked = S.sample(logits, torch.empty(3, 0, dtype=torch.long), S.SamplingConfig(do_sample=False))
    assert picked.tolist() == [7, 3, int(logits[2].argmax())] and torch.equal(picked, logits.argmax(-1))


def test_sampling_is_seeded_and_respects_top_k(logits, ids):
    s = S.SamplingConfig(top_k=3)
    a = [S.sample(logits, ids, s, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    draws = torch.stack([S.sample(logits, ids, s, torch.Generator().manual_seed(i)) for i in range(200)])
    top3 = logits.topk(3, -1).indices
    assert all(set(draws[:, b].tolist()) <= set(top3[b].tolist()) for b in range(4))
    assert len(set(draws[:, 0].tolist())) > 1  # it does sample


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=-1), "temperature"), (dict(top_p=1.5), "top_p"), (dict(top_p=0), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(min_p=2), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"), (dict(bad_words_ids=[[]]), "bad_words_ids"),
])
def test_invalid_settings_are_user_errors(kw, match):
    with pytest.raises(UserError, match=match):
        S.SamplingConfig(**kw)


def test_sampling_follows_the_distribution():
    """The exponential race draws each token with its softmax probability."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]]))
    s = S.SamplingConfig(top_k=0)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([S.sample(logits, torch.empty(1, 0, dtype=torch.long), s, g) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.03, rtol=0)

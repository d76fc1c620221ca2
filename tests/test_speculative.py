"""Speculative decoding: prompt-lookup drafts, greedy token for token, the sampling rule's exact distribution."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from kogpt.errors import UserError
from kogpt.generation.engine import Engine, Request, generate_ids
from kogpt.generation.hooks import RequestHook
from kogpt.generation.sampling import GREEDY, SamplingConfig, process
from kogpt.generation.speculative import draft, verify
from kogpt.hf.hub import resolve
from kogpt.hf.load import load
from kogpt.text.tokenizer import Tokenizer

from conftest import make_hf_model, shared_path

pytestmark = pytest.mark.usefixtures("one_thread")


def looping_prompts(lengths, seed=0):
    """Random ids, each prompt its own first half twice: drafts find matches, models tend to copy."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 1000, (n,), generator=g).tolist() * 2 for n in lengths]


def run(model, prompts, budgets, s=GREEDY, k=0, max_len=None, **kw):
    """Events per prompt key and the engine (its draft counters)."""
    engine = Engine(model, slots=len(prompts), max_len=max_len)
    for i, (p, n) in enumerate(zip(prompts, budgets)):
        engine.submit(Request(p, n, s, key=i, speculate=k, **kw))
    events: dict[int, list] = {i: [] for i in range(len(prompts))}
    while not engine.idle:
        for ev in engine.step():
            events[ev.key].append(ev)
    return events, engine


# -- the drafter ----------------------------------------------------------------------------------
def test_draft_copies_what_followed_the_longest_most_recent_tail():
    h = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6, 7]
    assert draft(h, 3) == [2, 3, 6]  # tail (6, 7): the most recent earlier occurrence is at 6
    assert draft(h + [8], 2) == [9, 1]  # tail (6, 7, 8) only occurs at 1: longer beats more recent
    assert draft([1, 2, 3, 4], 4) == []  # nothing recurs
    assert draft(h, 0) == [] and draft([7], 3) == []


def test_draft_of_a_loop_keeps_copying_itself():
    assert draft([4, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]  # period 2, still k ids
    assert draft([9, 9], 3) == [9, 9, 9]


# -- greedy: token for token ----------------------------------------------------------------------
@pytest.mark.parametrize("s", [GREEDY, SamplingConfig(do_sample=False, repetition_penalty=1.2, no_repeat_ngram_size=6)],
                         ids=["greedy", "penalties"])
def test_greedy_with_speculation_is_plain_greedy_in_a_batch(hf_dir, s):
    model = load(hf_dir)
    ps = looping_prompts([6, 13, 3, 9])
    plain, _ = run(model, ps, [40, 25, 40, 33], s)
    spec, engine = run(model, ps, [40, 25, 40, 33], s, k=4)
    assert engine.accepted > 0  # drafts were kept, so the test covers accepted ones
    assert {i: [e.token for e in ev] for i, ev in spec.items()} == {i: [e.token for e in ev] for i, ev in plain.items()}
    assert all([e.finish for e in ev] == [e.finish for e in plain[i]] for i, ev in spec.items())


def test_kogpt_mini_on_a_repetitive_prompt_keeps_drafts_and_its_output():
    model = load(resolve("kogpt-mini"), "fp32")
    tok = Tokenizer.from_dir(resolve("kogpt-mini"))
    text = "대한민국의 수도는 서울이다. 서울은 한강을 끼고 있는 큰 도시이다. 대한민국의 수도는"
    plain, plain_engine = run(model, [tok.encode(text)], [40])
    spec, engine = run(model, [tok.encode(text)], [40], k=5)
    assert [e.token for e in spec[0]] == [e.token for e in plain[0]]
    assert engine.accepted >= 20 and plain_engine.drafted == 0  # mostly several tokens per forward


def test_requests_joining_mid_way_get_their_plain_output(hf_dir):
    model = load(hf_dir)
    ps, budgets = looping_prompts([5, 12, 3, 8]), (30, 16, 25, 20)
    alone = [generate_ids(model, [p], max_new_tokens=n)[0] for p, n in zip(ps, budgets)]
    engine = Engine(model, slots=2)
    out: dict[int, list[int]] = {i: [] for i in range(4)}
    engine.submit(Request(ps[0], budgets[0], key=0, speculate=3))
    for step in itertools.count():
        if step in (1, 2, 3):  # three more arrive while request 0 decodes; only two rows exist
            engine.submit(Request(ps[step], budgets[step], key=step, speculate=(0, 2, 5, 8)[step]))
        for ev in engine.step():
            out[ev.key].append(ev.token)
        if engine.idle and step >= 3:
            break
    assert [out[i] for i in range(4)] == alone and engine.accepted > 0


def accepted_positions(model, p, k=6, budget=60) -> tuple[list[int], list[int]]:
    """The greedy output and the indices of its tokens that were accepted drafts followed by more tokens
    of the same step (so ending there drops the rest of the draft)."""
    engine = Engine(model, slots=1)
    engine.submit(Request(p, budget, speculate=k))
    steps = []
    while not engine.idle:
        steps.append([ev.token for ev in engine.step()])
    starts = itertools.accumulate(len(s) for s in steps[:-1])  # index of each later step's first token
    return [t for s in steps for t in s], [i for st, s in zip(starts, steps[1:]) for i in range(st, st + len(s) - 1)]


def assert_ends_like_plain(model, p, at: int, free: list[int], by_token: bool):
    """The budget, stop() and (by_token) EOS end the request at index `at`: the same Events as plain decoding."""
    cases = {"length": lambda: {}}  # fresh keyword arguments per run (a counting stop() has state)
    if by_token:
        cases |= {"eos": lambda: {"eos_ids": (free[at],)}, "stop": lambda: {"stop": lambda t: t == free[at]}}
    else:
        cases["stop"] = lambda: {"stop": (lambda n: lambda t: next(n) == at)(itertools.count())}
    for name, make in cases.items():
        budget = at + 1 if name == "length" else 60
        plain, _ = run(model, [p], [budget], **make())
        spec, _ = run(model, [p], [budget], k=6, **make())
        assert [e.token for e in spec[0]] == [e.token for e in plain[0]] == free[:at + 1]  # one Event per token
        assert [e.finish for e in spec[0]] == [None] * at + ["length" if name == "length" else "stop"]
        assert spec[0][-1].is_eos == (name == "eos")


def test_stop_and_budget_end_a_request_inside_an_accepted_draft(hf_dir):
    model, p = load(hf_dir), looping_prompts([7])[0]
    free, inside = accepted_positions(model, p)
    assert_ends_like_plain(model, p, inside[0], free, by_token=False)  # stop() counts its calls


def test_eos_ends_a_request_inside_an_accepted_draft():
    """An EOS id must be new in the output to end it there: kogpt-mini copying from a Wikipedia paragraph
    (the paragraph, then its first words again) finds such a token within a few paragraphs."""
    model, tok = load(resolve("kogpt-mini"), "fp32"), Tokenizer.from_dir(resolve("kogpt-mini"))
    with open(shared_path("corpus", "kowiki", "kowiki_sample.txt"), encoding="utf-8") as f:
        texts = [line.strip() for line in itertools.islice(f, 400) if 200 < len(line.strip()) < 500][:10]
    for text in texts:
        p = tok.encode(text + "\n\n" + " ".join(text.split()[:3]))
        free, inside = accepted_positions(model, p)
        new = [i for i in inside if free[i] not in free[:i]]
        if new:
            return assert_ends_like_plain(model, p, new[0], free, by_token=True)
    pytest.fail("no paragraph gave an accepted draft token new to the output")


def test_logprobs_are_those_of_plain_decoding(hf_dir):
    model = load(hf_dir)
    ps = looping_prompts([6])
    plain, _ = run(model, ps, [30], logprobs=3)
    spec, engine = run(model, ps, [30], k=4, logprobs=3)
    assert engine.accepted > 0
    for a, b in zip(spec[0], plain[0]):
        assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [i for i, _ in a.top] == [i for i, _ in b.top]


def test_requests_with_hooks_do_not_speculate(hf_dir):
    class Ban(RequestHook):
        def map_logits(self, logits):
            return logits.index_fill(0, torch.tensor([7, 8]), float("-inf"))

    model = load(hf_dir)
    ps = looping_prompts([6, 9])
    plain, _ = run(model, ps, [20, 20], hooks=[Ban()])
    spec, engine = run(model, ps, [20, 20], k=4, hooks=[Ban()])
    assert engine.drafted == 0
    assert [e.token for e in spec[0]] == [e.token for e in plain[0]]
    with pytest.raises(UserError, match="speculate"):
        Engine(model, 1).submit(Request([5], 3, speculate=-1))


# -- sampling: the distribution is the plain sampler's ---------------------------------------------
def test_verify_draws_each_position_from_the_processed_distribution():
    """First emitted id ~ p0 whatever the draft; after an accepted draft, the next ~ p1 computed with the
    draft in the history (repetition penalty). N draws; each frequency within 6 sigma (+1/N) of the truth."""
    torch.manual_seed(0)
    V, history, drafted = 6, [0, 1, 2], [3, 4]
    logits = torch.randn(3, V) * 1.5
    logits[0, 3] += 1.0  # the draft is likely but not certain
    s = SamplingConfig(temperature=0.9, top_k=5, repetition_penalty=2.0)
    ids = torch.tensor([[V, V] + history, [V] + history + drafted[:1], history + drafted])
    p = process(logits, ids, s).softmax(-1)
    N, first, second = 20000, torch.zeros(V), torch.zeros(V)
    rng = torch.Generator().manual_seed(1)
    for _ in range(N):
        out = verify(logits, history, drafted, s, rng)
        first[out[0]] += 1
        if out[0] == drafted[0]:
            second[out[1]] += 1
    for freq, truth, n in ((first / N, p[0], N), (second / second.sum(), p[1], second.sum())):
        sigma = (truth * (1 - truth) / n).sqrt()
        assert ((freq - truth).abs() <= 6 * sigma + 1 / n).all(), (freq, truth)
    cut = p[0] == 0
    assert cut.sum() == 1 and first[cut].sum() == 0  # top-k cut the least likely id: it is never drawn


def test_sampled_sequences_have_the_plain_distribution(family, tmp_path):
    """Many requests in one batch (one rng), a tiny vocabulary: the empirical distribution of the first three
    new ids with speculation matches their exact probabilities (from full recomputes), cell by cell."""
    model = load_tiny(family, tmp_path)
    s = SamplingConfig(temperature=1.2, top_k=6, repetition_penalty=1.5)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    N = 3000
    events, engine = run(model, [prompt] * N, [3] * N, s, k=3, max_len=16, rng=torch.Generator().manual_seed(0))
    assert engine.accepted > 0 and engine.drafted > engine.accepted  # both branches of the rule ran
    counts: dict[tuple, int] = {}
    for ev in events.values():
        seq = tuple(e.token for e in ev)
        counts[seq] = counts.get(seq, 0) + 1
    truth = exact_distribution(model, prompt, 3, s)
    assert math.isclose(sum(truth.values()), 1.0, abs_tol=1e-4)
    for seq, p in truth.items():
        sigma = math.sqrt(p * (1 - p) / N)
        assert abs(counts.get(seq, 0) / N - p) <= 6 * sigma + 1 / N, (seq, counts.get(seq, 0) / N, p)
    assert set(counts) <= {seq for seq, p in truth.items() if p > 0}


def load_tiny(family: str, folder):
    """A tiny random model with a vocabulary of 8, so every 3-token continuation has a measurable share."""
    make_hf_model(family, seed=1, vocab_size=8, initializer_range=0.5).save_pretrained(folder)
    return load(folder)


@torch.no_grad()
def exact_distribution(model, prompt, n, s) -> dict[tuple, float]:
    """P(first n new ids) under plain sampling, by enumerating every sequence with full recomputes."""
    out = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, p in out.items():
            ids = torch.tensor([prompt + list(seq)])
            probs = process(model(ids)[:, -1], ids, s).softmax(-1)[0]
            for t, q in enumerate(probs.tolist()):
                if q > 0:
                    nxt[seq + (t,)] = p * q
        out = nxt
    return out


# -- the command line -----------------------------------------------------------------------------
def test_generate_flag_speculates_and_prints_the_plain_text(model_dir, capsys):
    from kogpt.cli import main

    base = ["generate", "--model", str(model_dir), "--prompt", "안녕하세요 안녕하세요 안녕하세요", "--greedy",
            "--max-new-tokens", "24", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(base + ["--speculate", "4"]) == 0
    spec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert spec == plain and len(spec["completion_token_ids"]) > 0
    with pytest.raises(SystemExit):
        main(base + ["--speculate", "-1"])


def test_python_api_and_server_speculate_with_the_same_text(model_dir):
    import httpx

    from kogpt.api import KoGPT
    from kogpt.serve import create_app
    from test_serve import running

    gpt = KoGPT.from_pretrained(model_dir, device="cpu")
    prompt, opts = "안녕하세요 안녕하세요 안녕하세요", dict(greedy=True, max_new_tokens=24)
    plain = gpt.generate(prompt, **opts)
    assert gpt.generate(prompt, speculate=4, **opts) == plain
    with pytest.raises(UserError, match="speculate"):
        gpt.generate(prompt, speculate=-1, **opts)
    gpt.speculate = 4  # what `kogpt serve --speculate 4` sets: the default of every request
    with running(create_app(gpt)) as url:
        body = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
        texts = [httpx.post(f"{url}/v1/completions", json=body | extra, timeout=30).json()["choices"][0]["text"]
                 for extra in ({}, {"speculate": 0}, {"speculate": 2})]
        assert texts == [plain] * 3
        r = httpx.post(f"{url}/v1/completions", json=body | {"speculate": -1}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "speculate"

"""The one decode loop: transformers' greedy tokens, a naive-recompute oracle, batching, stopping."""

from __future__ import annotations

import pytest
import torch

from kogpt.hf.load import load
from kogpt.errors import UserError
from kogpt.generation.engine import Engine, Request, generate, generate_ids
from kogpt.generation.hooks import RequestHook
from kogpt.generation.sampling import GREEDY, SamplingConfig, sample

EOS = 2


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 1000, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("kw", [{}, {"repetition_penalty": 2.0}, {"no_repeat_ngram_size": 3}],
                         ids=["greedy", "rep2", "ngram3"])
def test_greedy_matches_transformers_generate(hf_model, hf_dir, kw):
    p = prompts([9])[0]
    expected = hf_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 do_sample=False, max_new_tokens=32, pad_token_id=3, eos_token_id=EOS, **kw)
    got = generate_ids(load(hf_dir), [p], max_new_tokens=32, sampling=SamplingConfig(do_sample=False, **kw),
                       eos_ids=[EOS])
    assert got[0] == expected[0, len(p):].tolist()


def naive(model, prompt, n, s, rng):
    """Oracle: full recompute of the whole sequence at every step, no cache."""
    ids = torch.tensor([prompt])
    for _ in range(n):
        logits = model(ids)[:, -1]
        ids = torch.cat([ids, sample(logits, ids, s, rng)[:, None]], 1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("s", [GREEDY, SamplingConfig(temperature=0.9, top_p=0.9, repetition_penalty=1.3)],
                         ids=["greedy", "sampled"])
@torch.no_grad()
def test_cached_loop_equals_naive_recompute(hf_dir, s):
    model = load(hf_dir)
    p = prompts([7])[0]
    got = generate_ids(model, [p], max_new_tokens=20, sampling=s, rng=torch.Generator().manual_seed(3))
    assert got[0] == naive(model, p, 20, s, torch.Generator().manual_seed(3))


@pytest.mark.parametrize("s", [GREEDY, SamplingConfig(do_sample=False, repetition_penalty=2.0,
                                                       no_repeat_ngram_size=2)], ids=["greedy", "penalties"])
def test_batch_with_mixed_lengths_equals_one_by_one(hf_dir, s):
    model = load(hf_dir)
    ps = prompts([3, 11, 6, 1])
    batch = generate_ids(model, ps, max_new_tokens=16, sampling=s)
    alone = [generate_ids(model, [p], max_new_tokens=16, sampling=s)[0] for p in ps]
    assert batch == alone


def test_rows_stop_on_eos_budget_and_stop_callback(hf_dir):
    model = load(hf_dir)
    ps = prompts([4, 5, 6])
    free = generate_ids(model, ps, max_new_tokens=12)
    others = set(free[1]) | set(free[2])
    eos = next(t for t in free[0][2:] if t not in others)  # pretend this token of row 0 is EOS
    events = list(generate(model, ps, max_new_tokens=[12, 5, 12], eos_ids=[eos],
                           stop=lambda row, tok: row == 2 and tok == free[2][1]))
    rows = {b: [e for e in events if e.key == b] for b in range(3)}
    cut = free[0].index(eos) + 1
    assert [e.token for e in rows[0]] == free[0][:cut] and rows[0][-1].finish == "stop" and rows[0][-1].is_eos
    assert [e.token for e in rows[1]] == free[1][:5] and rows[1][-1].finish == "length"
    assert len(rows[2]) == 2 and rows[2][-1].finish == "stop" and not rows[2][-1].is_eos
    assert all(e.finish is None for r in rows.values() for e in r[:-1])


def test_budget_is_capped_by_the_context(hf_dir):
    model = load(hf_dir)  # n_positions 128
    p = prompts([120])[0]
    events = list(generate(model, [p], max_new_tokens=50))
    assert len(events) == 8 and events[-1].finish == "length"
    with pytest.raises(UserError, match="context"):
        list(generate(model, prompts([128]), max_new_tokens=1))
    with pytest.raises(UserError, match="empty"):
        list(generate(model, [[]], max_new_tokens=1))


def test_requests_joining_mid_decode_get_their_solo_output(hf_dir):
    """Continuous batching: a request submitted while others decode joins at the next step and
    produces exactly what it produces alone; a finished request frees its row for the queue."""
    model = load(hf_dir)
    ps = prompts([5, 12, 3, 8])
    s = SamplingConfig(do_sample=False, repetition_penalty=1.5)
    alone = [generate_ids(model, [p], max_new_tokens=n, sampling=s)[0] for p, n in zip(ps, (10, 6, 9, 7))]
    engine = Engine(model, slots=2)
    out: dict[int, list[int]] = {i: [] for i in range(4)}
    engine.submit(Request(ps[0], 10, s, key=0))
    step = 0
    while not engine.idle or step < 3:
        if step in (1, 2, 3):  # three more arrive while request 0 decodes; only two rows exist
            i = step
            engine.submit(Request(ps[i], (10, 6, 9, 7)[i], s, key=i))
        for ev in engine.step():
            out[ev.key].append(ev.token)
        assert len(engine.rows) <= 2
        step += 1
    assert [out[i] for i in range(4)] == alone


def test_cancel_frees_the_row(hf_dir, caplog):
    model = load(hf_dir)
    engine = Engine(model, slots=1)
    hook = Probe(fail="finish")
    engine.submit(Request(prompts([4])[0], 50, key="a", hooks=[hook]))
    engine.submit(Request(prompts([6])[0], 3, key="b"))
    engine.step()
    assert [a.req.key for a in engine.rows.values()] == ["a"] and len(engine.queue) == 1
    assert engine.cancel("a") and not engine.rows
    assert hook.calls["finish"] == 1 and "failed to finish" in caplog.text  # nobody else to tell
    keys = [ev.key for _ in range(5) for ev in engine.step()]
    assert keys == ["b"] * 3 and engine.idle and not engine.cancel("a")


@torch.no_grad()
def test_logprobs_are_the_model_distribution(hf_dir):
    model = load(hf_dir)
    p = prompts([6])[0]
    engine = Engine(model, slots=1)
    engine.submit(Request(p, 3, key=0, logprobs=4))
    events = [ev for _ in range(3) for ev in engine.step()]
    ids = torch.tensor([p + [ev.token for ev in events]])
    logp = model(ids)[0, len(p) - 1:-1].log_softmax(-1)  # (3, V): the distribution each token came from
    for t, ev in enumerate(events):
        assert ev.logprob == pytest.approx(logp[t, ev.token].item(), abs=1e-4)
        assert [i for i, _ in ev.top] == logp[t].topk(4).indices.tolist()
        assert ev.top[0][0] == ev.token  # greedy picks the most likely id


class Probe(RequestHook):
    """A hook written outside the engine: counts its calls, bans ids `ban` (a logit mask) and raises
    in method `fail` on that method's `at`-th call."""

    def __init__(self, ban=(), fail=None, at=1, steps_last_prompt_token=False):
        self.ban, self.fail, self.at = list(ban), fail, at
        self.steps_last_prompt_token = steps_last_prompt_token
        self.calls = {"start": 0, "before_step": 0, "map_logits": 0, "finish": 0}

    def called(self, name):
        self.calls[name] += 1
        if name == self.fail and self.calls[name] == self.at:
            raise RuntimeError(f"boom in {name}")

    def start(self, cache, row, max_len):
        self.called("start")

    def before_step(self, model, cache, row, history):
        self.called("before_step")

    def map_logits(self, logits):
        self.called("map_logits")
        return logits.index_fill(0, torch.tensor(self.ban, dtype=torch.long), float("-inf"))

    def finish(self):
        self.called("finish")


@pytest.mark.parametrize("steps_last", [False, True], ids=["prefill-last", "step-last"])
@torch.no_grad()
def test_a_custom_hook_plugs_in_without_engine_changes(hf_dir, steps_last):
    model = load(hf_dir)
    a, b = prompts([5, 8])
    free = generate_ids(model, [a, b], max_new_tokens=10)
    ban = sorted(set(free[0][:4]))  # the unhooked run's first tokens, the very first included
    hook = Probe(ban, steps_last_prompt_token=steps_last)
    got = generate_ids(model, [b, a], max_new_tokens=10, hooks=[(), [hook]])
    ids = torch.tensor([a])
    for _ in range(10):  # oracle: full recompute, banned ids masked before the argmax
        logits = model(ids)[0, -1]
        logits[ban] = float("-inf")
        ids = torch.cat([ids, logits.argmax().view(1, 1)], 1)
    assert got == [free[1], ids[0, len(a):].tolist()] and not set(got[1]) & set(ban)
    steps = 10 if steps_last else 9  # a decode step per new token, or per token after the prefill's
    assert hook.calls == {"start": 1, "before_step": steps, "map_logits": 10, "finish": 1}
    # a hook that changes nothing changes nothing, wherever the last prompt token goes
    assert generate_ids(model, [a], max_new_tokens=10, hooks=[[Probe(steps_last_prompt_token=steps_last)]]) == free[:1]


@pytest.mark.parametrize("fail", ["start", "before_step", "map_logits", "finish"])
def test_a_raising_hook_ends_its_request_alone(hf_dir, fail):
    model = load(hf_dir)
    a, b = prompts([5, 8])
    free = generate_ids(model, [a, b], max_new_tokens=10)
    hook = Probe(fail=fail, at=1 if fail in ("start", "finish") else 3)
    engine = Engine(model, slots=2)
    engine.submit(Request(b, 10, key="b"))
    engine.submit(Request(a, 10, key="a", hooks=[hook]))
    events = [ev for _ in range(12) for ev in engine.step()]
    assert [ev.token for ev in events if ev.key == "b"] == free[1] and engine.idle
    mine = [ev for ev in events if ev.key == "a"]
    assert mine[-1].finish == "error" and f"boom in {fail}" in str(mine[-1].error)
    assert all(ev.finish is None for ev in mine[:-1]) and int(engine.cache.lengths.sum()) == 0
    if fail == "finish":  # the request ran to its end; its last token stands
        assert [ev.token for ev in mine] == free[0]
    else:
        assert mine[-1].token == -1 and [ev.token for ev in mine[:-1]] == free[0][:len(mine) - 1]
        assert hook.calls["finish"] == 1  # the row was freed through finish
    with pytest.raises(RuntimeError, match=f"boom in {fail}"):  # generate() hands the error to its caller
        generate_ids(model, [b, a], max_new_tokens=10, hooks=[(), [Probe(fail=fail)]])

"""PPLM bag-of-words steering: word targets, an upstream-faithful reference loop, stepsize 0, the API."""

from __future__ import annotations

import pytest
import torch

from kogpt.api import KoGPT
from kogpt.hf.folder import CheckpointError
from kogpt.hf.load import load
from kogpt.generation.engine import Engine, Request, generate_ids
from kogpt.core.kv_cache import KVCache
from kogpt.generation.sampling import GREEDY, SamplingConfig
from kogpt.generation.steering import (TOPICS, BagOfWords, PPLMConfig, Steerer, SteeringError, make_bags, read_words,
                            topics, word_sequences)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_targets_are_first_tokens_plus_words_in_progress():
    bag = BagOfWords("t", ["a", "b"], [(5,), (7, 8, 9), (7, 8, 4), (11, 12)])
    assert bag.targets([]) == {5, 7, 11}
    assert bag.targets([1, 7]) == {5, 7, 11, 8}  # 7 started a word: 8 continues it
    assert bag.targets([3, 7, 8]) == {5, 7, 11, 9, 4}  # both words sharing the prefix 7 8
    assert bag.targets([8]) == {5, 7, 11}  # 8 alone is no word prefix
    assert bag.targets([7, 8, 9]) == {5, 7, 11}  # a finished word pulls nothing more


def test_korean_words_keep_all_their_token_forms(korean_tokenizer):
    tok = korean_tokenizer
    for word in ["서울", "대한민국", "자연어", "영화"]:
        seqs = word_sequences(word, tok)
        for s in seqs:  # every form spells the word (word start with or without the space marker)
            assert tok.decode(list(s)).strip() == word
        assert tuple(tok.encode(word)) in seqs
        in_text = tok.encode("오늘 " + word + "에 갔다")
        assert any(in_text[i:i + len(s)] == list(s) for s in seqs for i in range(len(in_text)))
    # a word the vocabulary lacks is several tokens; upstream PPLM would drop it, here it counts
    bag = BagOfWords.from_words(["동백꽃잎사귀"], tok)
    assert bag.longest >= 1 and bag.next


def test_bundled_topics_and_word_files(tmp_path, korean_tokenizer):
    assert set(topics()) == set(TOPICS) and len(TOPICS) >= 5
    for name, korean in TOPICS.items():
        n1, words = read_words(name)
        assert (n1, words) == read_words(korean) and len(words) >= 30
        assert all(w == w.strip() and w for w in words)
    f = tmp_path / "bow.txt"
    f.write_text("# my topic\n축구, 야구\n\n농구\n", encoding="utf-8")
    assert read_words(str(f)) == (str(f), ["축구", "야구", "농구"])
    (tmp_path / "empty.txt").write_text("# nothing\n", encoding="utf-8")
    for bad, msg in [(str(tmp_path / "missing.txt"), "neither a bundled topic"),
                     (str(tmp_path / "empty.txt"), "has no words")]:
        with pytest.raises(SteeringError, match=msg):
            read_words(bad)
    bags = make_bags(["sports", ["서울", "부산"]], korean_tokenizer)
    assert [b.name for b in bags] == ["sports", "words"]
    assert make_bags(["서울", "부산"], korean_tokenizer)[0].words == ["서울", "부산"]


@pytest.mark.parametrize("bad", [{"stepsize": -1}, {"gm_scale": 1.5}, {"num_iterations": -2}, {"stepsz": 1},
                                 {"num_iterations": 3.0}, {"window_length": True}, {"stepsize": "0.1"}])
def test_bad_knobs_are_one_line_errors(bad):
    with pytest.raises(SteeringError):
        PPLMConfig.from_dict(bad)


def test_the_knobs_are_the_same_everywhere():
    import dataclasses

    from kogpt.cli.common import PPLM_FLAGS
    from kogpt.serve.protocol import PPLMOptions

    fields = {f.name for f in dataclasses.fields(PPLMConfig)}
    assert set(PPLM_FLAGS) == fields == set(PPLMOptions.model_fields)


def test_several_bow_flags_are_several_bags(tmp_path):
    import argparse

    from kogpt.cli.common import add_steering_arguments, steering_options

    p = argparse.ArgumentParser()
    add_steering_arguments(p)
    f = tmp_path / "w.txt"
    f.write_text("동백꽃\n", encoding="utf-8")
    opts = steering_options(p.parse_args(["--bow", "horror", "--bow", str(f), "--bow-words", "축구,야구"]))
    assert opts["bow"] == [read_words("horror")[1], ["동백꽃"], ["축구", "야구"]]
    assert steering_options(p.parse_args([])) == {}


# -- the algorithm ------------------------------------------------------------------------------
def reference(model, prompt, n, bow_ids, cfg, penalty=1.0):
    """Upstream run_pplm.py's loop for one prompt, greedy, written independently of kogpt.generation.steering:
    unsteered logits by full recompute of the unperturbed text; the past perturbed by normalized
    gradient steps and kept; the next token from p^gm · q^(1-gm). Single-token bag words."""

    class Past:  # a past that carries gradients, as upstream's list of tensors
        def __init__(self, k, v):
            self.k, self.v = k, v

        def prepare(self, rows, T):
            return torch.arange(self.k.size(3), self.k.size(3) + T)[None], None, False

        def update(self, layer, k, v):
            return torch.cat((self.k[layer], k), 2), torch.cat((self.v[layer], v), 2)

        def advance(self):
            pass

    one_hot = torch.zeros(len(bow_ids), model.config.vocab_size)
    one_hot[range(len(bow_ids)), bow_ids] = 1
    ids = list(prompt)
    cache = KVCache.for_model(model.config, 1, 64)
    with torch.no_grad():
        model(torch.tensor([ids[:-1]]), cache)
    k, v = cache.k[:, :, :, :len(ids) - 1].clone(), cache.v[:, :, :, :len(ids) - 1].clone()
    grad_norms, out = None, []
    for _ in range(n):
        last = torch.tensor([[ids[-1]]])
        with torch.no_grad():
            q_logits = model(torch.tensor([ids]))[0, -1]  # full recompute, never perturbed
            q = q_logits.softmax(-1)
        acc_k, acc_v = torch.zeros_like(k), torch.zeros_like(v)
        window = torch.ones(k.size(3), 1)
        if 0 < cfg.window_length < k.size(3):
            window[:k.size(3) - cfg.window_length] = 0  # the most recent window_length positions
        for _ in range(cfg.num_iterations if len(out) < cfg.grad_length else 0):
            pk, pv = (k + acc_k).requires_grad_(), (v + acc_v).requires_grad_()
            probs = model(last, Past(pk, pv))[0, -1].softmax(-1)[None]  # (1, V)
            loss = -torch.log(torch.sum(torch.mm(probs, one_hot.t())))
            qc = q + 1e-15 * (q <= 1e-15).float()
            pc = probs + 1e-15 * (probs <= 1e-15).float().detach()
            loss = loss + cfg.kl_scale * (pc * (pc / qc).log()).sum()
            loss.backward()
            gk, gv = pk.grad * window, pv.grad * window
            norms = torch.stack([(gk[i].norm() ** 2 + gv[i].norm() ** 2).sqrt() for i in range(k.size(0))])
            grad_norms = norms + 1e-15 if grad_norms is None else torch.maximum(grad_norms, norms)
            s = (cfg.stepsize / grad_norms ** cfg.gamma).view(-1, 1, 1, 1, 1)
            acc_k, acc_v = acc_k - s * gk, acc_v - s * gv
        with torch.no_grad():
            pk, pv = k + acc_k, v + acc_v
            c = KVCache.for_model(model.config, 1, 64)
            c.k[:, :, :, :pk.size(3)], c.v[:, :, :, :pk.size(3)], c.lengths[0] = pk, pv, pk.size(3)
            p_logits = model(last, c)[0, -1]
            k, v = c.k[:, :, :, :pk.size(3) + 1].clone(), c.v[:, :, :, :pk.size(3) + 1].clone()
        fused = cfg.gm_scale * p_logits + (1 - cfg.gm_scale) * q_logits  # log of p^gm q^(1-gm), unnormalized
        seen = torch.tensor(sorted(set(ids)))
        fused[seen] = torch.where(fused[seen] < 0, fused[seen] * penalty, fused[seen] / penalty)
        ids.append(int(fused.argmax()))
        out.append(ids[-1])
    return out


@pytest.mark.parametrize("knobs", [{}, {"window_length": 3, "grad_length": 4}], ids=["default", "window-grad_length"])
def test_engine_steering_equals_upstream_reference(hf_dir, knobs):
    model = load(hf_dir)
    cfg = PPLMConfig(stepsize=0.5, **knobs)  # large enough to change the greedy path of a random model
    bow_ids = [17, 101, 230, 499]
    bag = BagOfWords("t", [], [(i,) for i in bow_ids])
    prompt = [5, 60, 70, 8, 9]
    got = generate_ids(model, [prompt], max_new_tokens=8, sampling=GREEDY, hooks=[[Steerer([bag], cfg)]])[0]
    assert got == reference(model, prompt, 8, bow_ids, cfg)
    if not knobs:
        assert got != generate_ids(model, [prompt], max_new_tokens=8, sampling=GREEDY)[0]
    # the repetition penalty acts on the fused distribution as on plain logits
    s = SamplingConfig(do_sample=False, repetition_penalty=3.0)
    got = generate_ids(model, [prompt], max_new_tokens=16, sampling=s, hooks=[[Steerer([bag], cfg)]])[0]
    assert got == reference(model, prompt, 16, bow_ids, cfg, penalty=3.0)


def test_a_steered_row_batched_with_others_equals_its_solo_run(hf_dir):
    model = load(hf_dir)
    bag = BagOfWords("t", [], [(17,), (101, 230)])
    a, b = [5, 60, 70, 8, 9], [44, 3]
    mk = lambda: Steerer([bag], PPLMConfig(stepsize=0.5))  # noqa: E731
    solo_a = generate_ids(model, [a], max_new_tokens=10, hooks=[[mk()]])[0]
    solo_b = generate_ids(model, [b], max_new_tokens=10)[0]
    assert generate_ids(model, [b, a], max_new_tokens=10, hooks=[(), [mk()]]) == [solo_b, solo_a]
    shared = mk()
    with pytest.raises(SteeringError, match="one request"):
        generate_ids(model, [a, b], max_new_tokens=4, hooks=[[shared], [shared]])


class Failing(Steerer):
    """Fails in its third perturb (think: out of memory in the backward pass), or already in start()."""

    def __init__(self, *a, at_start=False, **kw):
        super().__init__(*a, **kw)
        self.at_start, self.calls = at_start, 0

    def start(self, cache, row, max_len):
        if self.at_start:
            raise RuntimeError("boom at start")
        super().start(cache, row, max_len)

    def perturb(self, model, cache, row, history):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        super().perturb(model, cache, row, history)


@pytest.mark.parametrize("at_start", [False, True])
def test_a_failing_steered_request_ends_alone(hf_dir, at_start):
    model = load(hf_dir)
    bag = BagOfWords("t", [], [(17,), (101, 230)])
    a, b = [5, 60, 70, 8, 9], [44, 3]
    solo_b = generate_ids(model, [b], max_new_tokens=10)[0]
    engine = Engine(model, slots=2)
    failing = Failing([bag], PPLMConfig(stepsize=0.5), at_start=at_start)
    engine.submit(Request(b, 10, key="b"))
    engine.submit(Request(a, 10, key="a", hooks=[failing]))
    events = [ev for _ in range(20) for ev in engine.step()]
    (err,) = [ev for ev in events if ev.finish == "error"]
    assert err.key == "a" and err.token == -1 and "boom" in str(err.error)
    assert len([ev for ev in events if ev.key == "a"]) == (1 if at_start else 3)  # 2 steered tokens, then the error
    assert [ev.token for ev in events if ev.key == "b"] == solo_b and engine.idle
    assert failing.shadow is None and int(engine.cache.lengths.sum()) == 0  # its caches were freed
    with pytest.raises(RuntimeError, match="boom"):  # generate() hands the error to its caller
        generate_ids(model, [b, a], max_new_tokens=10, hooks=[(), [Failing([bag], PPLMConfig(stepsize=0.5))]])


class Recording(Steerer):
    """Records, per step, the bag's probability mass with and without steering."""

    def perturb(self, model, cache, row, history):
        self.last_targets = self.targets(history)
        super().perturb(model, cache, row, history)

    def fuse(self, logits):
        fused = super().fuse(logits)
        t = torch.tensor(sorted(set().union(*self.last_targets)))
        self.mass = getattr(self, "mass", []) + [(fused.softmax(-1)[t].sum().item(),
                                                  self.unsteered.softmax(-1)[t].sum().item())]
        return fused


def test_steering_raises_the_bags_probability_every_step(hf_dir):
    model = load(hf_dir)
    bag = BagOfWords("t", [], [(17,), (101, 230), (499, 12, 40)])
    steer = Recording([bag], PPLMConfig(stepsize=0.05))
    generate_ids(model, [[5, 60, 70, 8, 9, 33]], max_new_tokens=12, sampling=GREEDY, hooks=[[steer]])
    assert len(steer.mass) == 12
    assert all(s > u for s, u in steer.mass), steer.mass


@pytest.mark.parametrize("dtype", [None, "bf16", "int8"])
def test_zero_stepsize_through_the_loop_changes_nothing(hf_dir, dtype):
    """The whole steered path (shadow cache, perturbation, fusion) with stepsize 0 gives the unsteered
    greedy tokens; gradients flow through packed bf16 and int8 layers too."""
    model = load(hf_dir, dtype)  # int8: weight-only (int8-dynamic's rounding depends on the batch)
    bag = BagOfWords("t", [], [(17,), (101, 230)])
    ps = [[5, 60, 70, 8, 9], [44]]
    plain = generate_ids(model, ps, max_new_tokens=10, sampling=GREEDY)
    steered = generate_ids(model, ps, max_new_tokens=10, sampling=GREEDY,
                           hooks=[[Steerer([bag], PPLMConfig(stepsize=0.0))], ()])
    assert steered == plain
    moved = generate_ids(model, ps[:1], max_new_tokens=10, sampling=GREEDY,
                         hooks=[[Steerer([bag], PPLMConfig(stepsize=2.0))]])
    assert moved != plain[:1]  # and a real step does move it (the gradient path works in this dtype)


def test_api_stepsize_zero_reproduces_unsteered_sampling_exactly(model_dir):
    gpt = KoGPT.from_pretrained(model_dir)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.0, seed=7, num_return_sequences=3)
    plain = gpt.generate("서울은", top_k=10, **kw)
    assert gpt.generate("서울은", bow=["서울", "한국"], pplm={"stepsize": 0}, **kw) == plain
    steered = gpt.generate("서울은", bow=["서울", "한국"], pplm={"stepsize": 0.5}, **kw)
    assert steered != plain and len(steered) == 3
    with pytest.raises(SteeringError, match="unknown pplm option"):
        gpt.generate("서울은", bow="sports", pplm={"step": 1})
    with pytest.raises(SteeringError, match="neither a bundled topic"):
        gpt.generate("서울은", bow="no-such-topic")


@pytest.mark.parametrize("family", ["gpt2"])
def test_cli_generate_steers_and_checks_flags_before_loading(model_dir):
    import json
    import subprocess
    import sys

    def run(*flags):
        return subprocess.run([sys.executable, "-m", "kogpt", "generate", "--model", str(model_dir), "--prompt",
                               "서울은", "--max-new-tokens", "8", "--temperature", "1", "--seed", "3", "--json", *flags],
                              capture_output=True, text=True, timeout=120)

    plain, off = run("--top-k", "10"), run("--bow-words", "서울,한국", "--pplm-stepsize", "0")
    steered = run("--bow-words", "서울,한국", "--bow", "sports", "--pplm-stepsize", "0.5")
    assert plain.returncode == off.returncode == steered.returncode == 0, steered.stderr
    assert json.loads(off.stdout)["completion"] == json.loads(plain.stdout)["completion"]
    assert json.loads(steered.stdout)["completion_token_ids"] != json.loads(plain.stdout)["completion_token_ids"]
    for flags, msg in [(("--bow", "nosuch"), "neither a bundled topic"), (("--pplm-gamma", "1"), "need --bow"),
                       (("--bow", "sports", "--pplm-gm-scale", "2"), "gm_scale must be in [0, 1]")]:
        r = run(*flags)
        assert r.returncode == 2 and msg in r.stderr and "loading" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("family", ["gpt2"])
def test_steering_benchmark_runs_and_stepsize_zero_is_the_unsteered_run(model_dir, tmp_path, capsys):
    import importlib.util
    import json

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("steering_bench", ROOT / "benchmarks" / "steering.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "s.json"
    assert bench.main(["--model", str(model_dir), "--topics", "sports,과학", "--prompts", "2", "--samples", "2",
                       "--max-new-tokens", "6", "--stepsize", "0,0.5", "--json", str(out)]) == 0
    d = json.loads(out.read_text(encoding="utf-8"))
    assert set(d["topics"]) == {"sports", "science"} and set(d["topics"]["sports"]) == {"0.0", "0.5"}
    for topic in d["topics"].values():
        off = topic["0.0"]
        assert len(off["samples"]) == 4 and all(s["steered"] == s["unsteered"] for s in off["samples"])
        assert off["steered"] == off["unsteered"]
        assert any(s["steered"] != s["unsteered"] for s in topic["0.5"]["samples"])
    assert "| sports (스포츠) | 0.5 | 4 |" in capsys.readouterr().out
    assert bench.main(["--model", str(model_dir), "--topics", "nosuch"]) == 2


def test_fusion_is_the_geometric_mix_on_the_logit_scale():
    """softmax(fuse) = p^gm q^(1-gm) renormalized, and equal inputs come back unchanged, so the
    repetition penalty (÷ positive, × negative logits) acts as it does without steering."""
    g = torch.Generator().manual_seed(0)
    steered, plain = torch.randn(50, generator=g) * 3, torch.randn(50, generator=g) * 3
    s = Steerer([BagOfWords("t", [], [(1,)])], PPLMConfig(gm_scale=0.7))
    s.unsteered = plain
    mix = steered.softmax(-1) ** 0.7 * plain.softmax(-1) ** 0.3
    torch.testing.assert_close(s.fuse(steered).softmax(-1), mix / mix.sum())
    s.unsteered = steered.clone()
    torch.testing.assert_close(s.fuse(steered), steered)


def test_a_model_ships_its_own_steering_strength(tmp_path):
    """kogpt-mini's generation_config.json carries its measured stepsize (upstream's 0.02 does not move a 19M
    model; docs/steering.md); pplm= overrides it, and save_pretrained keeps it."""
    gpt = KoGPT.from_pretrained("kogpt-mini", device="cpu", dtype="fp32")
    assert gpt.defaults.pplm == {"stepsize": 0.1}
    assert gpt.steerers("sports", None, 1)[0].config.stepsize == 0.1
    assert gpt.steerers("sports", {"stepsize": 0.02, "num_iterations": 2}, 1)[0].config.stepsize == 0.02
    assert gpt.steerers("sports", {"stepsize": 0}, 1) is None  # still turns steering off
    gpt.save_pretrained(tmp_path / "copy")
    assert KoGPT.from_pretrained(tmp_path / "copy", device="cpu").defaults.pplm == {"stepsize": 0.1}
    (tmp_path / "copy" / "generation_config.json").write_text('{"pplm": {"stepsize": -1}}')
    with pytest.raises(CheckpointError, match="generation_config.json"):
        KoGPT.from_pretrained(tmp_path / "copy", device="cpu")

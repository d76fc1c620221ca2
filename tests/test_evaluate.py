"""Evaluation: log-likelihoods equal transformers', perplexity, sliding windows, metrics, `kogpt eval`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import KOREAN_LINES, ROOT
from kogpt.api import KoGPT
from kogpt.errors import UserError
from kogpt.evaluation.fewshot import evaluate_fewshot
from kogpt.evaluation.perplexity import evaluate_perplexity, sliding_windows
from kogpt.evaluation.report import json_ready, markdown_table
from kogpt.evaluation.scoring import continuation_logprobs, score_all, start_id
from kogpt.evaluation.metrics import accuracy, f1, macro_f1, pearson, ranks, spearman
from kogpt.evaluation.tasks import TASKS, Example

SENTENCES = [line.rstrip(".!?") for line in KOREAN_LINES]


@pytest.fixture
def gpt(model_dir):
    return KoGPT.from_pretrained(model_dir, device="cpu")


def hf_logprob(hf_model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) computed by transformers on the whole sequence."""
    with torch.no_grad():
        logp = hf_model(torch.tensor([context + continuation])).logits[0].double().log_softmax(-1)
    return sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(continuation))


def examples(task: str) -> list[Example]:
    n = len(TASKS[task].choices)
    return [Example(f"e{i}", s, i % n, text_pair=SENTENCES[(i + 3) % len(SENTENCES)], score=i % 6 * 0.9)
            for i, s in enumerate(SENTENCES)]


# -- parity with transformers -------------------------------------------------------------------
@pytest.mark.parametrize("task", ["nsmc", "ynat", "korsts"])
def test_choice_loglikelihoods_equal_transformers(gpt, hf_model, task):
    t, data = TASKS[task], examples(task)
    pool, queries = data[:5], data[5:]
    res = evaluate_fewshot(gpt, t, queries, pool=pool, shots=2, seed=3, batch_size=2)  # batches mix prompt lengths
    by_id = {e.id: e for e in pool}
    bos = gpt.tokenizer.bos_id
    for ex, rec in zip(queries, res["predictions"]):
        # 2 shots fit the tiny model's 128 positions for nsmc; longer ynat/korsts prompts drop some to fit
        assert len(rec["shot_ids"]) == 2 or task != "nsmc"
        prompt = t.prompt(ex, [by_id[i] for i in rec["shot_ids"]])
        context = [bos, *gpt.tokenizer.encode(prompt)]
        expected = []
        for c in t.continuations():
            whole = [bos, *gpt.tokenizer.encode(prompt + c)]
            assert whole[:len(context)] == context  # the label word starts at a space: a clean split
            expected.append(hf_logprob(hf_model, context, whole[len(context):]))
        torch.testing.assert_close(rec["logprobs"], expected, atol=1e-4, rtol=0)
        assert rec["pred"] == max(range(len(expected)), key=expected.__getitem__)
    assert res["n"] == len(queries) and res["truncated"] == 0
    assert res["shots_dropped"] == sum(2 - len(p["shot_ids"]) for p in res["predictions"])


def test_continuations_of_mixed_lengths_in_one_batch(gpt, hf_model):
    tok = gpt.tokenizer
    contexts = [[1, *tok.encode("대한민국의 수도는 서울이다. 오늘")], [1], [1, *tok.encode("커피")]]
    conts = [[tok.encode(" 날씨가 정말 좋네요"), [7]], [tok.encode("안녕하세요")], [[9], [5, 6, 7, 8], [9, 9]]]
    got = continuation_logprobs(gpt.model, contexts, conts)
    expected = [[hf_logprob(hf_model, c, x) for x in cs] for c, cs in zip(contexts, conts)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["gpt2"])
def test_score_all_batches_by_length_and_answers_in_input_order(gpt):
    rng = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(10, 1000, (n,), generator=rng).tolist()  # noqa: E731
    # lengths out of order; the 120-token context and the 100-token continuation fit 128 positions
    # only apart, so score_all must split them into different forwards
    contexts = [ids(n) for n in (5, 120, 1, 30, 7, 2)]
    conts = [[ids(3), ids(1)], [ids(2)], [ids(100)], [ids(4), ids(4), ids(9)], [ids(1)], [ids(6), ids(2)]]
    one_by_one = [continuation_logprobs(gpt.model, [c], [cs])[0] for c, cs in zip(contexts, conts)]
    for batch_size in (1, 2, 4, 8):
        got = score_all(gpt.model, contexts, conts, batch_size=batch_size)
        assert [len(g) for g in got] == [len(cs) for cs in conts]
        for g, e in zip(got, one_by_one):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        continuation_logprobs(gpt.model, [contexts[1], contexts[2]], [conts[1], conts[2]])
    with pytest.raises(ValueError, match="non-empty"):
        continuation_logprobs(gpt.model, [[1]], [[[5], []]])


def test_scored_text_needs_a_start_token():
    assert start_id(types.SimpleNamespace(start_id=0)) == 0  # id 0 is a real token, not "missing"
    with pytest.raises(UserError, match="neither a BOS nor an EOS"):
        start_id(types.SimpleNamespace(start_id=None))


def test_perplexity_equals_transformers(gpt, hf_model):
    docs = ["안녕하세요. 한국어 GPT 모델입니다.\n오늘 날씨가 정말 좋네요 ㅋㅋㅋ", "커피 한 잔 하실래요?"]
    res = evaluate_perplexity(gpt, docs, batch_size=2)
    nats = 0.0
    tokens = 0
    for d in docs:
        ids = gpt.tokenizer.encode(d)
        nats -= hf_logprob(hf_model, [gpt.tokenizer.bos_id], ids)
        tokens += len(ids)
    nbytes, chars = sum(len(d.encode()) for d in docs), sum(map(len, docs))
    m = res["metrics"]
    assert (res["tokens"], res["bytes"], res["chars"]) == (tokens, nbytes, chars)
    assert m["bits_per_byte"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    assert m["bits_per_char"] == pytest.approx(nats / math.log(2) / chars, rel=1e-5)
    assert m["token_perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-5)
    assert sum(p["nats"] for p in res["predictions"]) == pytest.approx(nats, rel=1e-5)
    # text shorter than the window: any window and stride gives the no-window result
    res2 = evaluate_perplexity(gpt, docs, max_length=64, stride=7, batch_size=1)
    assert res2["metrics"]["bits_per_byte"] == pytest.approx(m["bits_per_byte"], rel=1e-5)


@pytest.mark.parametrize("family", ["gpt2"])
def test_sliding_window_perplexity_scores_each_token_once_with_its_window(gpt, hf_model):
    doc = " ".join(SENTENCES)
    ids = [gpt.tokenizer.bos_id, *gpt.tokenizer.encode(doc)]
    assert len(ids) > 60
    res = evaluate_perplexity(gpt, [doc], max_length=24, stride=10, batch_size=3)
    expected = -sum(hf_logprob(hf_model, ids[max(0, e - 24):s], ids[s:e])
                    for s, e in [(1, 24)] + [(s, min(s + 10, len(ids))) for s in range(24, len(ids), 10)])
    assert res["tokens"] == len(ids) - 1
    assert res["predictions"][0]["nats"] == pytest.approx(expected, rel=1e-5)
    full = evaluate_perplexity(gpt, [doc])["predictions"][0]["nats"]
    assert full != pytest.approx(expected, rel=1e-3)  # a short window really cuts the context


@given(n=st.integers(0, 200), window=st.integers(2, 40), data=st.data())
def test_sliding_windows_cover_every_target_once(n, window, data):
    stride = data.draw(st.integers(1, window - 1))
    ids = list(range(100, 100 + n))
    pieces = sliding_windows(ids, window, stride)
    assert [t for _, tg in pieces for t in tg] == ids[1:]
    for i, (ctx, tg) in enumerate(pieces):
        assert ctx and tg and len(ctx) + len(tg) <= window
        start = ids.index(tg[0])
        assert ctx == ids[start - len(ctx):start]  # the tokens right before the targets
        if i:  # later pieces fill the window; the last one may keep more context than window - stride
            assert len(ctx) >= window - stride and len(ctx) + len(tg) == window


def test_sliding_windows_reject_a_stride_without_overlap():
    with pytest.raises(UserError, match="stride must be in"):
        sliding_windows([1, 2, 3], 4, 4)


# -- few-shot details ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2"])
def test_shots_are_seeded_never_the_query_and_dropped_to_fit(gpt):
    t, data = TASKS["nsmc"], [Example(f"e{i}", f"영화 {i}", i % 2) for i in range(12)]
    a = evaluate_fewshot(gpt, t, data, pool=data, shots=3, seed=1)
    b = evaluate_fewshot(gpt, t, data[:2], pool=data, shots=3, seed=1)  # --limit keeps the same shots
    c = evaluate_fewshot(gpt, t, data, pool=data, shots=3, seed=2)
    ids = lambda r: [p["shot_ids"] for p in r["predictions"]]  # noqa: E731
    assert ids(a)[:2] == ids(b) and ids(a) != ids(c)
    assert all(len(s) == 3 and p["id"] not in s for p, s in zip(a["predictions"], ids(a)))
    assert (a["seed"], a["shots"], a["prompt_version"], a["choices"]) == (1, 3, "nsmc-v1", ["부정", "긍정"])
    short = evaluate_fewshot(gpt, t, data, pool=data, shots=3, seed=1, max_length=30)
    assert short["shots_dropped"] > 0 and short["truncated"] == 0  # shots go before any token is cut
    tiny = evaluate_fewshot(gpt, t, data, pool=data, shots=1, seed=1, max_length=8)
    assert tiny["truncated"] > 0 and all(p["shot_ids"] == [] for p in tiny["predictions"])
    with pytest.raises(UserError, match="--max-length must be in"):
        evaluate_fewshot(gpt, t, data, max_length=1000)
    with pytest.raises(UserError, match="--shots needs --fewshot-data"):
        evaluate_fewshot(gpt, t, data, shots=2)


# -- metrics ---------------------------------------------------------------------------------
def test_metrics_on_hand_computed_examples():
    gold, pred = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    assert accuracy(gold, pred) == pytest.approx(4 / 6)
    # class 0: tp 1, pred 2, gold 2 -> 0.5; class 1: tp 2, pred 3, gold 2 -> 0.8; class 2: tp 1, pred 1, gold 2 -> 2/3
    assert f1(gold, pred, 1) == pytest.approx(0.8)
    assert macro_f1(gold, pred) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert f1([0, 0], [0, 0]) == 0.0  # no positive anywhere
    assert macro_f1([0, 0], [0, 1]) == pytest.approx((2 / 3 + 0) / 2)  # a class only predicted counts
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(0.9933992677987828)
    assert math.isnan(pearson([1, 2, 3], [5, 5, 5]))
    assert ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # scipy's value, ties
    with pytest.raises(ValueError, match="2 gold labels but 1 predictions"):
        accuracy([0, 1], [0])


def test_markdown_table_and_json_ready():
    few = {"model": "m", "task": "korsts", "prompt_version": "sts-v1", "shots": 5, "n": 10,
           "metrics": {"spearman": 0.123456, "pearson": math.nan}}
    ppl = {"model": "m", "task": "perplexity", "n": 3, "metrics": {"bits_per_byte": 1.23456}}
    assert markdown_table([few, ppl]).splitlines() == [
        "| model | task | prompt | shots | n | spearman | pearson | bits_per_byte |",
        "|---|---|---|---|---|---|---|---|",
        "| m | korsts | sts-v1 | 5 | 10 | 12.35 | - | - |",
        "| m | perplexity | - | - | 3 | - | - | 1.2346 |"]
    assert json.dumps(json_ready(few)) and json_ready(few)["metrics"]["pearson"] is None


# -- the command line, in subprocesses ---------------------------------------------------------
def kogpt(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kogpt", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("family", ["gptj"])
def test_cli_eval_fewshot_writes_json(model_dir, tmp_path):
    data = tmp_path / "nsmc.tsv"
    data.write_text("id\tdocument\tlabel\n" + "".join(f"{i}\t{s}\t{i % 2}\n" for i, s in enumerate(SENTENCES)),
                    encoding="utf-8")
    out = tmp_path / "out" / "nsmc.json"
    r = kogpt("eval", "--model", model_dir, "--task", "nsmc", "--data", data, "--shots", 2, "--fewshot-data", data,
              "--seed", 4, "--limit", 5, "--batch-size", 2, "--output", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "| model | task | prompt | shots | n | accuracy | macro_f1 |"
    res = json.loads(out.read_text(encoding="utf-8"))
    assert {k: res[k] for k in ("model", "task", "prompt_version", "seed", "shots", "n", "data", "fewshot_data")} == {
        "model": str(model_dir), "task": "nsmc", "prompt_version": "nsmc-v1", "seed": 4, "shots": 2, "n": 5,
        "data": str(data), "fewshot_data": str(data)}
    assert set(res["metrics"]) == {"accuracy", "macro_f1"} and len(res["predictions"]) == 5
    assert res["predictions"][0].keys() == {"id", "gold", "pred", "logprobs", "shot_ids"}


@pytest.mark.parametrize("family", ["gpt2"])
def test_cli_eval_perplexity(model_dir, tmp_path):
    text = tmp_path / "wiki.txt"
    text.write_text("첫 문서의 첫 줄.\n첫 문서의 둘째 줄.\n\n둘째 문서.\n", encoding="utf-8")
    out = tmp_path / "ppl.json"
    r = kogpt("eval", "--model", model_dir, "--task", "perplexity", "--data", text, "--output", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["n"] == 2 and res["chars"] == len("첫 문서의 첫 줄.\n첫 문서의 둘째 줄.") + len("둘째 문서.")
    assert set(res["metrics"]) == {"bits_per_byte", "bits_per_char", "token_perplexity", "nats_per_token"}
    assert res["max_length"] == 128 and res["stride"] == 64


@pytest.mark.parametrize("family", ["gpt2"])
@pytest.mark.parametrize("args,msg", [
    (["--task", "nsmc", "--data", "no/such.tsv"], "data file not found: no/such.tsv"),
    (["--task", "nsmc", "--data", "BAD"], "BAD:3: expected 3 tab-separated fields"),
    (["--task", "nsmc", "--data", "BAD", "--shots", "2"], "--shots needs --fewshot-data"),
    (["--task", "perplexity", "--data", "no/such.txt"], "no/such.txt"),
    (["--task", "perplexity", "--data", "BAD", "--max-length", "4096"], "--max-length must be in [2, 128]"),
])
def test_cli_eval_bad_input_is_one_line_and_exit_2(model_dir, tmp_path, args, msg):
    bad = tmp_path / "bad.tsv"
    bad.write_text("id\tdocument\tlabel\n1\t좋다\t1\n2\t싫다\n", encoding="utf-8")
    r = kogpt("eval", "--model", model_dir, *[str(bad) if a == "BAD" else a for a in args])
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if "error" in x]
    assert len(errors) == 1 and msg.replace("BAD", str(bad)) in errors[0] and "Traceback" not in r.stderr


# -- the TF-IDF baseline (benchmarks/downstream.py) ----------------------------------------------
def test_tfidf_baseline_learns_separable_data(tmp_path, capsys):
    pytest.importorskip("sklearn")
    import importlib.util

    spec = importlib.util.spec_from_file_location("downstream", ROOT / "benchmarks" / "downstream.py")
    downstream = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(downstream)
    words = {1: ["최고", "감동", "재밌다"], 0: ["최악", "지루", "별로"]}
    rows = [f"{i}\t{SENTENCES[i % 8]} {words[i % 2][i % 3]}\t{i % 2}\n" for i in range(600)]
    nsmc = tmp_path / "nsmc.tsv"
    nsmc.write_text("id\tdocument\tlabel\n" + "".join(rows), encoding="utf-8")
    assert downstream.main(["--task", "nsmc", "--train", str(nsmc), "--output", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert f"trained on 480 rows of {nsmc}; evaluated on held-out 20% of {nsmc} (seed 0)" in out
    res = json.loads((tmp_path / "b.json").read_text(encoding="utf-8"))
    assert res["n"] == 120 and res["metrics"]["accuracy"] > 0.95 and res["model"].startswith("tfidf-char1-3+logreg")
    # --write-split: the same rows as files, so kogpt finetune / eval can use exactly this split
    split = tmp_path / "split"
    assert downstream.main(["--task", "nsmc", "--train", str(nsmc), "--write-split", str(split),
                            "--output", str(tmp_path / "c.json")]) == 0
    parts = {n: (split / f"{n}.tsv").read_text(encoding="utf-8").splitlines() for n in ("train", "heldout")}
    assert all(rows[0] == "id\tdocument\tlabel" for rows in parts.values())
    assert sorted(parts["train"][1:] + parts["heldout"][1:]) == sorted(r.removesuffix("\n") for r in rows)
    assert len(parts["heldout"]) == 121
    capsys.readouterr()
    assert downstream.main(["--task", "nsmc", "--train", str(split / "train.tsv"), "--eval", str(split / "heldout.tsv"),
                            "--output", str(tmp_path / "d.json")]) == 0
    again = json.loads((tmp_path / "d.json").read_text(encoding="utf-8"))
    assert again["metrics"] == json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["metrics"]
    assert again["train_rows"] == 480 and again["n"] == 120
    own = split / "train.tsv"  # writing the split beside an input named train.tsv would overwrite it
    assert downstream.main(["--task", "nsmc", "--train", str(own), "--write-split", str(split)]) == 2
    assert len(own.read_text(encoding="utf-8").splitlines()) == 481
    with pytest.raises(SystemExit) as exit_:
        downstream.main(["--task", "nsmc", "--train", str(nsmc), "--eval", str(nsmc), "--write-split", str(split)])
    assert exit_.value.code == 2
    pairs = [(SENTENCES[i % 8], SENTENCES[i % 8] if i % 2 else SENTENCES[(i + 3) % 8], 5.0 * (i % 2)) for i in range(60)]
    sts = tmp_path / "sts.tsv"
    sts.write_text("genre\tfilename\tyear\tid\tscore\tsentence1\tsentence2\n"
                   + "".join(f"g\tf\ty\t{i}\t{s}\t{a}\t{b}\n" for i, (a, b, s) in enumerate(pairs)), encoding="utf-8")
    assert downstream.main(["--task", "korsts", "--train", str(sts), "--eval", str(sts)]) == 0
    captured = capsys.readouterr()
    assert "too few for a meaningful baseline" in captured.err and "| tfidf-char1-3+ridge" in captured.out

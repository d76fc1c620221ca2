"""Finetuning: the score head equals transformers', framing, a tiny NSMC run that learns, best-on-val
selection, exact resume, `kogpt eval` with the head, and one-line errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_hf_model, shared_path
from kogpt.core.classifier import Classifier, Head, last_non_pad
from kogpt.evaluation.classify import frame, pad_rows, predict
from kogpt.hf.folder import read_head
from kogpt.hf.load import load
from kogpt.hf.save import save_model
from kogpt.cli import main
from kogpt.errors import UserError
from kogpt.training.finetune import FinetuneConfig, finetune
from kogpt.core.model import GPT
from kogpt.evaluation.tasks import Example, get_task
from kogpt.evaluation.tasks.base import split_examples
from kogpt.training.loop import _improves
from kogpt.training.state import checkpoints

TINY = dict(batch_size=16, grad_accum=1, lr=1e-3, eval_batch_size=64, log_every=1, progress=False, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def load_classifier(folder: Path):
    """The classifier of a folder and what its head means."""
    return load(folder), read_head(folder)[0]


@pytest.fixture(scope="module")
def review_tokenizer(tmp_path_factory):
    from kogpt.text.bpe import train_tokenizer

    lines = shared_path("corpus", "movie_reviews", "naver_movie_reviews_nonbench.txt").read_text(
        encoding="utf-8").splitlines()[:3000]
    path = tmp_path_factory.mktemp("reviews") / "reviews.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return train_tokenizer([path], vocab_size=1000, show_progress=False)


def lm_folder(root: Path, family: str, tokenizer) -> Path:
    """A random-init transformers LM (default init scale, so it trains) with a kogpt tokenizer."""
    folder = root / f"lm-{family}"
    if not folder.exists():
        make_hf_model(family, initializer_range=0.02).save_pretrained(folder)
        tokenizer.save(folder)
    return folder


@pytest.fixture(scope="module")
def nsmc_file(tmp_path_factory) -> Path:
    """The first 400 rows of the real NSMC training file."""
    with open(shared_path("bench", "nsmc", "ratings_train.txt"), encoding="utf-8") as f:
        lines = [next(f) for _ in range(401)]
    path = tmp_path_factory.mktemp("nsmc") / "nsmc.tsv"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def log_of(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def nsmc_run(tmp_path_factory, review_tokenizer, nsmc_file) -> Path:
    """GPT-2: 4 epochs over 360 NSMC rows (40 held out), validating every 9 steps, checkpoints every 18."""
    root = tmp_path_factory.mktemp("nsmc_run")
    finetune(FinetuneConfig.from_settings(model=str(lm_folder(root, "gpt2", review_tokenizer)), task="nsmc",
                                          train=str(nsmc_file), out=str(root / "run"), epochs=4, eval_every=9,
                                          save_every=18, keep_last=10, dropout=0.0, **TINY))
    return root / "run"


# -- the head: parity with transformers -------------------------------------------------------------
@pytest.mark.parametrize("num_labels", [3, 1])
def test_classifier_forward_equals_transformers(family, hf_dir, tmp_path, num_labels):
    import transformers

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=num_labels).eval()
    with torch.no_grad():
        hf.score.weight.normal_(0.0, 0.5)  # a head that makes each position's state show
    hf.save_pretrained(tmp_path / "cls")
    ours, head = load_classifier(tmp_path / "cls")
    assert ours.config.pad_token_id == 3 and head.regression == (num_labels == 1) and len(head.labels) == num_labels
    # right-padded with pad 3; a pad inside a row, and a row of pads only (HF reads its position 0)
    ids = pad_rows([[5, 6, 7, 8, 9, 1], [1, 200, 1], [3, 3], [1, 2, 3, 400, 3]], 3)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-4)
    assert last_non_pad(ids, 3).tolist() == [5, 2, 0, 3]


@torch.no_grad()
def test_saved_classifier_loads_in_transformers_with_the_same_logits(family, hf_dir, korean_tokenizer, tmp_path):
    import transformers

    model = Classifier(load(hf_dir), 7)
    head = Head.for_task(get_task("ynat"), 64)
    save_model(model, tmp_path / "out", head, best_step=3)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == {"gpt2": "GPT2", "gptj": "GPTJ"}[family] + "ForSequenceClassification"
    assert hf.config.id2label[5] == "스포츠" and hf.config.problem_type == "single_label_classification"
    texts = ["안녕하세요", "오늘 날씨가 정말 좋네요 ㅋㅋㅋ", ""]
    examples = [Example(str(i), s, 0) for i, s in enumerate(texts)]
    rows, _ = frame(korean_tokenizer, examples, 64, model.config.pad_token_id)
    ids = pad_rows(rows, model.config.pad_token_id)
    torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-4)
    again, head2 = load_classifier(tmp_path / "out")
    assert head2 == head and torch.equal(again(ids), model(ids))


# -- framing ----------------------------------------------------------------------------------------
def test_framing_follows_kogpt2_subtasks(korean_tokenizer):
    tok, eos, pad = korean_tokenizer, korean_tokenizer.eos_id, korean_tokenizer.pad_id
    a, b = "오늘 날씨가 정말 좋네요", "커피 한 잔 하실래요?"
    ia, ib = tok.encode(a), tok.encode(b)
    rows, owner = frame(tok, [Example("0", a, 1)], 64, pad)
    assert rows == [[eos, *ia, eos]] and owner == [0]  # </s> text </s>
    rows, owner = frame(tok, [Example("0", a, 1, text_pair=b, score=4.0)], 64, pad)
    assert rows == [[eos, *ia, eos, *ib, eos], [eos, *ib, eos, *ia, eos]] and owner == [0, 0]  # both orders
    rows, _ = frame(tok, [Example("0", a * 20, 1, text_pair=b, score=4.0)], 16, pad)
    assert all(len(r) == 16 and r[-1] == eos for r in rows)  # cut at the end, the longer text first
    cut = rows[0].index(eos, 1)
    x, y = rows[0][1:cut], rows[0][cut + 1:-1]
    assert x == tok.encode(a * 20)[:len(x)] and y == ib[:len(y)] and len(x) + len(y) == 13
    assert len(y) == len(ib) or abs(len(x) - len(y)) <= 1  # the longer is cut first, then both in turn
    rows, _ = frame(tok, [Example("0", a, 1)], 64, pad_id=eos)  # pad == EOS: no closing EOS to mistake for padding
    assert rows == [[eos, *ia]]


def test_pairs_are_scored_as_the_mean_of_both_orders(korean_tokenizer):
    torch.manual_seed(0)
    from kogpt.core.config import GPTConfig

    model = Classifier(GPT(GPTConfig.preset("tiny-gpt2").replace(vocab_size=1000, pad_token_id=3)), 1).eval()
    head = Head.for_task(get_task("korsts"), 64)
    ex = Example("0", "오늘 날씨가 좋네요", 1, text_pair="커피 한 잔 하실래요?", score=4.0)
    (pred,) = predict(model, head, korean_tokenizer, [ex])
    rows, _ = frame(korean_tokenizer, [ex], 64, 3)
    with torch.no_grad():
        both = [model(torch.tensor([r]))[0, 0].item() for r in rows]
    assert pred.score == pytest.approx(sum(both) / 2) and pred.label == int(pred.score >= 3)
    assert both[0] != pytest.approx(both[1])


# -- a tiny finetune ----------------------------------------------------------------------------------
def test_tiny_nsmc_finetune_learns(nsmc_run):
    val = [r for r in log_of(nsmc_run) if "val_loss" in r]
    assert [r["step"] for r in val] == [9, 18, 27, 36, 45, 54, 63, 72, 81, 90]  # 360 rows × 4 epochs / 16
    assert val[-1]["train_accuracy"] > 0.85 and val[-1]["train_loss"] < val[0]["train_loss"] - 0.3  # far above chance
    run = json.loads((nsmc_run / "config.json").read_text(encoding="utf-8"))
    assert run["finetune"]["train_examples"] == 360 and run["finetune"]["val_examples"] == 40
    assert (run["train"]["seq_len"], run["train"]["lr"], run["train"]["warmup_steps"]) == (64, 1e-3, 9)


def test_best_checkpoint_is_the_validation_best(nsmc_run, nsmc_file, review_tokenizer):
    val = [r for r in log_of(nsmc_run) if "val_loss" in r]
    best = max(val, key=lambda r: (r["val_accuracy"], -r["step"]))  # the first of the highest
    assert all(r["best_step"] == max((v for v in val if v["step"] <= r["step"]),
                                     key=lambda v: (v["val_accuracy"], -v["step"]))["step"] for r in val)
    model, head = load_classifier(nsmc_run / "model")
    info = json.loads((nsmc_run / "model" / "config.json").read_text(encoding="utf-8"))["kogpt_finetune"]
    assert info["best_step"] == best["step"] and info["val_metrics"]["val_accuracy"] == best["val_accuracy"]
    # the folder holds that step's weights: it reproduces the logged validation numbers
    examples = get_task("nsmc").load(nsmc_file)
    train, held = split_examples(examples, 0.1, 0)
    preds = predict(model, head, review_tokenizer, held)
    assert get_task("nsmc").metrics(held, preds)["accuracy"] == pytest.approx(best["val_accuracy"])
    assert not {e.id for e in held} & {e.id for e in train}


def test_selection_ignores_nan_and_keeps_the_first_best():
    assert _improves(0.5, None, "max") and _improves(float("nan"), None, "max")
    assert _improves(0.1, {"value": float("nan")}, "max") and not _improves(float("nan"), {"value": 0.1}, "max")
    assert not _improves(0.5, {"value": 0.5}, "max") and _improves(0.4, {"value": 0.5}, "min")


def test_resume_continues_exactly(nsmc_run, tmp_path, nsmc_file):
    for p in checkpoints(nsmc_run / "checkpoints"):
        if p.name <= "step-00000036.pt":
            (tmp_path / "checkpoints").mkdir(exist_ok=True)
            shutil.copy(p, tmp_path / "checkpoints")
    shutil.copy(nsmc_run / "log.jsonl", tmp_path)
    shutil.copytree(nsmc_run / "model", tmp_path / "model")
    cfg = json.loads((nsmc_run / "config.json").read_text(encoding="utf-8"))["finetune"]
    result = finetune(FinetuneConfig.from_settings(model=cfg["model"], task="nsmc", train=str(nsmc_file),
                                                   out=str(tmp_path), epochs=4, eval_every=9, save_every=18,
                                                   keep_last=10, dropout=0.0, resume=True, **TINY))
    assert result.step == 90
    a, b = log_of(nsmc_run), log_of(tmp_path)
    assert [r for r in b if r["step"] > 36] and [(r.get("loss"), r.get("val_loss")) for r in a] == [
        (r.get("loss"), r.get("val_loss")) for r in b]  # steps 37-90 again, exactly
    with pytest.raises(UserError, match="trained on other data"):  # another training file: refused
        finetune(FinetuneConfig.from_settings(model=cfg["model"], task="nsmc", train=str(nsmc_file),
                                              out=str(tmp_path), epochs=4, limit=300, resume=True, **TINY))


def test_dropout_follows_the_config_masks_training_and_resumes_exactly(tmp_path, review_tokenizer, nsmc_file):
    lm = lm_folder(tmp_path, "gpt2", review_tokenizer)  # transformers' GPT2Config: resid_pdrop 0.1
    kw = dict(model=str(lm), task="nsmc", train=str(nsmc_file), max_steps=4, eval_every=2, keep_last=5, **TINY)
    finetune(FinetuneConfig.from_settings(out=str(tmp_path / "on"), **kw))
    finetune(FinetuneConfig.from_settings(out=str(tmp_path / "off"), dropout=0.0, **kw))
    on, off = log_of(tmp_path / "on"), log_of(tmp_path / "off")
    assert json.loads((tmp_path / "on" / "config.json").read_text(encoding="utf-8"))["train"]["dropout"] == 0.1
    assert on[0]["loss"] != pytest.approx(off[0]["loss"], rel=1e-3)  # the same batch, masked
    again = tmp_path / "again"  # resumed at step 2: steps 3-4 draw the same masks
    (again / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "on" / "checkpoints" / "step-00000002.pt", again / "checkpoints")
    shutil.copy(tmp_path / "on" / "log.jsonl", again)
    shutil.copytree(tmp_path / "on" / "model", again / "model")
    assert finetune(FinetuneConfig.from_settings(out=str(again), resume=True, **kw)).step == 4
    assert [(r.get("loss"), r.get("val_loss")) for r in log_of(again)] == [(r.get("loss"), r.get("val_loss")) for r in on]


# -- kogpt eval with the head -------------------------------------------------------------------------
def test_eval_uses_the_finetuned_head(nsmc_run, nsmc_file, review_tokenizer, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert main(["eval", "--model", str(nsmc_run / "model"), "--task", "nsmc", "--data", str(nsmc_file),
                 "--limit", "50", "--batch-size", "7", "--output", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| model | task | prompt | shots | n | accuracy | macro_f1 |" and "finetuned head" in table[2]
    res = json.loads(out.read_text(encoding="utf-8"))
    assert (res["method"], res["prompt_version"], res["finetuned_on"], res["n"]) == ("finetuned", None, "nsmc", 50)
    model, head = load_classifier(nsmc_run / "model")
    examples = get_task("nsmc").load(nsmc_file)[:50]
    want = predict(model, head, review_tokenizer, examples)
    assert [p["pred"] for p in res["predictions"]] == [p.label for p in want]
    for rec, p in zip(res["predictions"], want):
        assert rec["logprobs"] == pytest.approx(list(p.logprobs), abs=1e-5)
    acc = sum(p.label == e.label for p, e in zip(want, examples)) / 50
    assert res["metrics"]["accuracy"] == pytest.approx(acc)


# -- the flags -----------------------------------------------------------------------------------------
def test_flags_compose_the_loop_config_with_the_recipe_defaults(monkeypatch):
    """`kogpt finetune`: its own settings, and the training loop's (a TrainConfig) with the KoGPT2-subtasks
    recipe's defaults; every own setting is a flag, and no flag is listed twice."""
    import kogpt.training.finetune as ft
    from kogpt.cli.finetune import GROUPS
    from kogpt.training.loop import TrainResult

    names = " ".join(GROUPS.values()).split()
    assert len(names) == len(set(names)) and set(ft.FIELDS) <= set(names)
    seen = []
    monkeypatch.setattr(ft, "finetune", lambda fc: seen.append(fc) or TrainResult(0, None, None, {}))
    assert main(["finetune", "--model", "m", "--task", "nsmc", "--train", "t.tsv", "--out", "r", "--lr", "1e-3",
                 "--max-steps", "7", "--no-progress"]) == 0
    fc = seen[0]
    assert (fc.model, fc.task, fc.train, fc.max_steps) == ("m", "nsmc", "t.tsv", 7)
    assert (fc.epochs, fc.warmup, fc.dropout, fc.eval_every, fc.save_every, fc.eval_batch_size) == (3.0, 0.1, -1.0, 0,
                                                                                                     0, 64)
    loop = fc.loop
    assert (loop.out, loop.lr, loop.progress) == ("r", 1e-3, False)
    assert (loop.batch_size, loop.grad_accum, loop.seq_len, loop.min_lr, loop.weight_decay, loop.beta1, loop.beta2,
            loop.keep_last, loop.log_every, loop.sample_tokens, loop.seed, loop.dtype, loop.device) == (
        32, 4, 64, 0.0, 0.01, 0.9, 0.999, 2, 10, 0, 1337, "bfloat16", "auto")


# -- errors -------------------------------------------------------------------------------------------
def one_line_error(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err


def test_bad_inputs_give_one_line_errors(nsmc_run, nsmc_file, tmp_path, capsys):
    lm = json.loads((nsmc_run / "config.json").read_text(encoding="utf-8"))["finetune"]["model"]
    base = ["finetune", "--model", lm, "--out", str(tmp_path / "r")]
    one_line_error(capsys, [*base, "--task", "nsmc"], "--train is required")
    one_line_error(capsys, [*base, "--task", "ynat", "--train", str(nsmc_file)], "expected the header", "guid")
    one_line_error(capsys, [*base, "--task", "nli", "--train", str(nsmc_file)], "unknown task 'nli'")
    one_line_error(capsys, [*base, "--task", "nsmc", "--train", str(nsmc_file), "--seq-len", "512"],
                   "--seq-len 512 exceeds the model's n_positions 128")
    one_line_error(capsys, [*base, "--task", "nsmc", "--train", str(nsmc_file), "--val", str(nsmc_file),
                            "--val-fraction", "0.2"], "not both")
    model = str(nsmc_run / "model")
    one_line_error(capsys, ["eval", "--model", model, "--task", "ynat", "--data",
                            str(shared_path("bench", "klue_ynat", "ynat-v1.1_train.tsv")), "--limit", "3"],
                   "head of 2 output(s)", "ynat needs 7")
    one_line_error(capsys, ["eval", "--model", model, "--task", "nsmc", "--data", str(nsmc_file), "--shots", "2",
                            "--fewshot-data", str(nsmc_file)], "finetuned classifier", "--shots")
    one_line_error(capsys, ["eval", "--model", model, "--task", "perplexity", "--data", str(nsmc_file)],
                   "no language-model head")
    assert not (tmp_path / "r").exists()  # every error came before training


def test_an_earlier_run_is_refused_or_reported(nsmc_run, nsmc_file, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(nsmc_run, run)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    lm = json.loads((nsmc_run / "config.json").read_text(encoding="utf-8"))["finetune"]["model"]
    base = ["finetune", "--model", lm, "--task", "nsmc", "--train", str(nsmc_file), "--out", str(run)]
    one_line_error(capsys, base, "holds an earlier run", "--resume", "--overwrite")
    one_line_error(capsys, [*base, "--resume", "--epochs", "4", "--max-steps", "50", "--batch-size", "16",
                            "--grad-accum", "1"], "at step 90, past max_steps 50")
    result = finetune(FinetuneConfig.from_settings(model=lm, task="nsmc", train=str(nsmc_file), out=str(run), epochs=4,
                                                   eval_every=9, save_every=18, keep_last=10, resume=True, **TINY))
    assert (result.step, result.model_dir) == (90, run / "model")
    assert "nothing to train" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    shutil.rmtree(run / "model")  # the best model cannot come back from the last checkpoint: said, not guessed
    one_line_error(capsys, [*base, "--resume", "--epochs", "4", "--batch-size", "16", "--grad-accum", "1",
                            "--lr", "1e-3", "--eval-batch-size", "64", "--eval-every", "9", "--save-every", "18",
                            "--keep-last", "10", "--device", "cpu"], "best model", "is missing")


@pytest.mark.parametrize("flags, words", [
    (["--device", "foo"], ["device must be cpu, cuda, cuda:N or auto"]),
    (["--lr", "nan"], ["--lr must be > 0"]),
    (["--lr", "-1"], ["--lr must be > 0"]),
    (["--epochs", "inf"], ["--epochs must be > 0"]),
    (["--weight-decay", "-0.1"], ["--weight-decay must be >= 0"]),
    (["--dropout", "1"], ["--dropout must be in [0, 1)"]),
    (["--dtype", "float16"], ["--dtype must be one of"]),
    (["--resume", "--overwrite"], ["not both"]),
])
def test_bad_runtime_flags_fail_before_any_work(nsmc_file, tmp_path, capsys, flags, words):
    out = tmp_path / "r"
    one_line_error(capsys, ["finetune", "--model", "nowhere", "--task", "nsmc", "--train", str(nsmc_file), "--out",
                            str(out), *flags], *words)  # the flags are checked before the model is looked for
    assert not out.exists()


@pytest.mark.slow
def test_cli_korsts_gptj_folder_equals_transformers(tmp_path, review_tokenizer):
    """The command line end to end on KorSTS with GPT-J: a regression head that transformers reproduces."""
    import transformers

    lines = shared_path("bench", "korsts", "sts-train.tsv").read_text(encoding="utf-8").splitlines(True)[:201]
    data = tmp_path / "sts.tsv"
    data.write_text("".join(lines), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "kogpt", "finetune", "--model", str(lm_folder(tmp_path, "gptj",
                        review_tokenizer)), "--task", "korsts", "--train", str(data), "--out", str(tmp_path / "run"),
                        "--max-steps", "12", "--batch-size", "8", "--grad-accum", "2", "--lr", "1e-3", "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    model, head = load_classifier(tmp_path / "run" / "model")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model").eval()
    assert hf.config.problem_type == "regression" and hf.config.num_labels == 1 and head.task == "korsts"
    examples = get_task("korsts").load(data)[:10]
    rows, owner = frame(review_tokenizer, examples, 64, model.config.pad_token_id)
    ids = pad_rows(rows, model.config.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-4)
    preds = predict(model, head, review_tokenizer, examples)
    with torch.no_grad():
        theirs = hf(ids).logits[:, 0].view(-1, 2).mean(1)  # both orders of each pair, averaged
    assert [p.score for p in preds] == pytest.approx(theirs.tolist(), abs=1e-5)
    assert not math.isnan(json.loads((tmp_path / "run" / "model" / "config.json").read_text())[
        "kogpt_finetune"]["val_metrics"]["val_spearman"])


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, review_tokenizer, nsmc_file):
    lm = lm_folder(tmp_path, "gpt2", review_tokenizer)
    flags = ["finetune", "--model", str(lm), "--task", "nsmc", "--train", str(nsmc_file), "--max-steps", "6",
             "--eval-every", "3", "--batch-size", "8", "--grad-accum", "2", "--lr", "1e-3", "--dtype", "float32",
             "--log-every", "1", "--dropout", "0", "--no-progress"]  # dropout masks depend on the split of a batch
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, launcher in ((tmp_path / "one", [sys.executable, "-m", "kogpt"]),
                          (tmp_path / "two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc_per_node", "2", "-m", "kogpt"])):
        r = subprocess.run([*launcher, *flags, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = log_of(tmp_path / "one"), log_of(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):  # the same steps: each rank takes its half of every global batch
        keys = [k for k in ("loss", "val_loss", "train_loss", "val_accuracy") if k in x]
        assert keys and [x[k] for k in keys] == pytest.approx([y[k] for k in keys], rel=1e-4)

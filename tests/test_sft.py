"""Instruction (chat) tuning: the chat template's token mask, the answer loss equals transformers' (labels
-100) and gives masked tokens no gradient, bad rows with file:line, a CLI run that lowers the validation
answer loss and exports a model `kogpt generate` runs, exact resume after SIGKILL, torchrun, and LoRA (--lora-r)
runs that write a PEFT adapter and resume exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_hf_model
from kogpt.data.chats import read_conversations
from kogpt.errors import UserError
from kogpt.hf.load import load
from kogpt.text.chat import ChatTemplate
from kogpt.training.config import TrainConfig
from kogpt.training.loop import Env
from kogpt.training.sft import IGNORE, AnswerLoss, SFTObjective, encode_conversations
from kogpt.training.state import checkpoints

from test_train import PAUSING_SAVES, _wait_for, cli_flags, kogpt, losses

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [("안녕하세요?", "네, 안녕하세요. 반가워요!"), ("오늘 날씨 어때?", "맑고 따뜻해요."),
         ("대한민국의 수도는?", "서울이에요."), ("커피 한 잔 할래?", "좋아요, 같이 가요."),
         ("영화 추천해 줘", "동백꽃을 원작으로 한 영화를 추천해요."), ("배고파", "맛있는 밥을 드세요 ㅋㅋㅋ")]
SMALL = dict(batch_size=4, grad_accum=2, seq_len=128, lr=3e-3, log_every=1, progress=False, device="cpu",
             sample_tokens=4, peak_flops=1e12)


def chat_rows() -> list[dict]:
    """Every format of row: prompt/completion, messages with a system turn, a multi-turn conversation."""
    rows = []
    for i in range(4):
        for q, a in PAIRS:
            rows.append({"prompt": q, "completion": a})
    rows.append({"messages": [{"role": "system", "content": "짧게 답하세요."}, {"role": "user", "content": "안녕?"},
                              {"role": "assistant", "content": "안녕!"}]})
    rows.append({"messages": [{"role": "system", "content": "대화"}, {"role": "user", "content": PAIRS[0][0]},
                              {"role": "assistant", "content": PAIRS[0][1]}, {"role": "user", "content": PAIRS[1][0]},
                              {"role": "assistant", "content": PAIRS[1][1]}]})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, korean_tokenizer) -> Path:
    """A random-init transformers GPT-2 (default init scale, so it trains) with a kogpt tokenizer."""
    folder = tmp_path_factory.mktemp("lm")
    make_hf_model("gpt2", initializer_range=0.02).save_pretrained(folder)
    korean_tokenizer.save(folder)
    return folder


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", chat_rows())


def objective(tok, convs, **kw) -> SFTObjective:
    examples, _ = encode_conversations(convs, ChatTemplate.default(), tok, 128, skip_bad=False)
    obj = SFTObjective(Path("."), tok, ChatTemplate.default(), examples, examples, seed=0, info={})
    obj.cfg, obj.env = TrainConfig(**{**SMALL, **kw}), Env(1, 0, torch.device("cpu"))
    return obj


# -- the template: one rendering for serving and training -----------------------------------------
def test_training_ids_start_with_the_served_prompt_and_mask_the_reply(korean_tokenizer):
    t, tok = ChatTemplate.default(), korean_tokenizer
    q, a = PAIRS[4]
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    ids, mask = t.encode(messages, tok)
    prompt, stops = t.render(messages[:1])
    served = tok.encode(prompt)  # what `kogpt serve` feeds the model for this question
    assert ids[:len(served)] == served and not any(mask[:len(served)])
    assert all(mask[len(served):]) and ids[-1] == tok.eos_id  # the reply, its newline and EOS are the model's
    assert tok.decode(ids[len(served):-1]) == f"{a}\n"  # (a decoded piece loses its leading space)
    text = "".join(p for p, _ in t.pieces(messages))
    assert ids[:-1] == tok.encode(text) and prompt == text[:len(prompt)]  # tokenized whole, as serving does
    assert stops == ["\n사용자:", "\n어시스턴트:"]


def test_multi_turn_masks_every_assistant_turn_and_no_other(korean_tokenizer):
    tok, conv = korean_tokenizer, chat_rows()[-1]["messages"]
    ids, mask = ChatTemplate.default().encode(conv, tok)
    written = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(written, skip_special_tokens=True) == f"{PAIRS[0][1]}\n {PAIRS[1][1]}\n"
    assert PAIRS[1][0] in tok.decode([i for i, m in zip(ids, mask) if not m])


def test_a_template_file_decides_what_the_model_writes(korean_tokenizer, tmp_path):
    """The model writes what follows the `generation` prompt; without one it writes the whole assistant turn."""
    tok, m = korean_tokenizer, [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "반가워요"}]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"system": "", "user_turn": "Q: {content}\n", "assistant_turn": "A: {content}\n",
                                "generation": "A:"}), encoding="utf-8")
    pieces = ChatTemplate.from_file(path).pieces(m)
    assert pieces == [("Q: 안녕\n", False), ("A:", False), (" 반가워요\n", True)]
    path.write_text(json.dumps({"system": "", "assistant_turn": "A: {content}\n", "generation": ""}), encoding="utf-8")
    ids, mask = ChatTemplate.from_file(path).encode(m, tok)
    assert tok.decode([i for i, w in zip(ids, mask) if w], skip_special_tokens=True) == "A: 반가워요\n"


# -- the loss ---------------------------------------------------------------------------------------
def _convs(n: int):
    from kogpt.data.chats import Conversation

    return [Conversation(f"x:{i}", [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for i, (q, a) in enumerate(PAIRS[:n])]


@pytest.mark.parametrize("family", ["gpt2", "gptj"])
def test_answer_loss_equals_transformers_with_ignored_labels(family, korean_tokenizer, tmp_path):
    hf = make_hf_model(family)
    hf.save_pretrained(tmp_path)
    obj = objective(korean_tokenizer, _convs(4))
    ids, labels = obj._batch(obj.train)  # rows of different lengths, right-padded
    assert (labels == IGNORE).any() and (labels != IGNORE).any() and (ids == obj.pad).any()
    want = hf(input_ids=ids, labels=labels).loss
    net = AnswerLoss(load(tmp_path))
    torch.testing.assert_close(net(ids, labels), want, atol=1e-5, rtol=1e-5)
    # a step's loss is the mean over its answer tokens, whatever micro-batches they fall into
    obj.model = net.model
    step = sum(obj.loss(net, b) / 2 for b in obj.micro_batches(0, 2))
    rows = obj._step_rows(0)
    ids, labels = obj._batch([obj.train[i] for i in rows])
    torch.testing.assert_close(step, hf(input_ids=ids, labels=labels).loss, atol=1e-5, rtol=1e-5)


def test_masked_tokens_get_no_gradient(korean_tokenizer, tmp_path):
    make_hf_model("gpt2").save_pretrained(tmp_path)
    model = load(tmp_path)
    obj = objective(korean_tokenizer, _convs(3))
    ids, labels = obj._batch(obj.train)
    seen = {}
    hidden = model.hidden

    def keep(x):
        seen["h"] = h = hidden(x)
        h.retain_grad()
        return h

    model.hidden = keep
    AnswerLoss(model)(ids, labels).backward()
    g = seen["h"].grad.norm(dim=-1)  # (B, T-1): the gradient reaching each position's prediction
    trained = labels[:, 1:] != IGNORE
    assert (g[~trained] == 0).all() and (g[trained] > 0).all()
    assert model.wte.weight.grad is not None


# -- bad rows ---------------------------------------------------------------------------------------
BAD = [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ({"text": "안녕"}, "needs 'messages', or 'prompt' and 'completion'"),
    ({"messages": [{"role": "user"}]}, "needs 'role' and 'content'"),
    ({"messages": [{"role": "bot", "content": "안녕"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": " "}]}, "empty assistant"),
    ({"messages": [{"role": "user", "content": "안녕"}]}, "no assistant turn"),
    ({"prompt": "안녕", "completion": ""}, "empty assistant"),
]


@pytest.mark.parametrize("row, why", BAD, ids=[w for _, w in BAD])
def test_a_bad_row_is_named_by_file_and_line(row, why, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [*chat_rows()[:2], "", row, *chat_rows()[:1]])
    with pytest.raises(UserError, match=f"{path}:4: .*{why}"):
        read_conversations(path)
    good, bad = read_conversations(path, skip_bad=True)
    assert len(good) == 3 and len(bad) == 1 and bad[0].startswith(f"{path}:4: ")


def test_csv_rows_keep_their_line_numbers(tmp_path):
    path = tmp_path / "chat.csv"
    path.write_text('Q,A,label\n안녕,반가워요,0\n"여러 줄\n질문","여러 줄\n답",0\n빈 답,,0\n끝,네,0\n', encoding="utf-8")
    with pytest.raises(UserError, match=f"{path}:6: message 1 is an empty assistant turn"):
        read_conversations(path)
    good, bad = read_conversations(path, skip_bad=True)
    assert [c.where for c in good] == [f"{path}:2", f"{path}:3", f"{path}:7"]
    assert good[1].messages == [{"role": "user", "content": "여러 줄\n질문"}, {"role": "assistant", "content": "여러 줄\n답"}]
    (tmp_path / "qa.csv").write_text("question,answer\n안녕,네\n", encoding="utf-8")
    with pytest.raises(UserError, match="needs Q and A columns"):
        read_conversations(tmp_path / "qa.csv")


def test_a_conversation_longer_than_the_context_is_a_bad_row(korean_tokenizer):
    convs = _convs(3)
    with pytest.raises(UserError, match=r"x:\d: the conversation has \d+ tokens, more than --seq-len 30"):
        encode_conversations(convs, ChatTemplate.default(), korean_tokenizer, 30, skip_bad=False)
    good, bad = encode_conversations(convs, ChatTemplate.default(), korean_tokenizer, 30, skip_bad=True)
    assert len(good) + len(bad) == 3 and bad


def _one_line_error(r: subprocess.CompletedProcess, *words: str):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), r.stderr


def test_cli_bad_rows_fail_in_one_line_or_are_skipped_and_counted(lm_dir, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [*chat_rows()[:6], BAD[4][0], BAD[0][0], *chat_rows()[6:12]])
    flags = ["--model", str(lm_dir), "--train", str(path), "--max-steps", "1", "--batch-size", "2",
             "--grad-accum", "1", "--seq-len", "128", "--device", "cpu", "--no-progress", "--sample-tokens", "0"]
    _one_line_error(kogpt("sft", *flags, "--out", str(tmp_path / "a")), f"{path}:7:", "unknown role", "--skip-bad-rows")
    r = kogpt("sft", *flags, "--out", str(tmp_path / "b"), "--skip-bad-rows")
    assert r.returncode == 0, r.stderr
    assert f"skipped 2 bad row(s) (--skip-bad-rows); the first: {path}:7:" in r.stdout
    assert json.loads((tmp_path / "b" / "config.json").read_text())["sft"]["skipped_rows"] == 2
    _one_line_error(kogpt("sft", *flags, "--out", str(tmp_path / "c"), "--seq-len", "9999"), "n_positions 128")
    _one_line_error(kogpt("sft", *flags[:2], "--out", str(tmp_path / "d")), "--train is required")


# -- the flags ---------------------------------------------------------------------------------------
def test_flags_compose_the_loop_config_with_the_sft_recipe(monkeypatch):
    """`kogpt sft`: its own settings and the training loop's (a TrainConfig) with the recipe's defaults;
    every own setting is a flag, and no flag is listed twice."""
    import kogpt.training.sft as sft
    from kogpt.cli import main
    from kogpt.cli.sft import GROUPS
    from kogpt.training.loop import TrainResult

    names = " ".join(GROUPS.values()).split()
    assert len(names) == len(set(names)) and set(sft.FIELDS) <= set(names)
    seen = []
    monkeypatch.setattr(sft, "sft", lambda sc: seen.append(sc) or TrainResult(0, None, None, {}))
    assert main(["sft", "--model", "m", "--train", "c.jsonl", "--out", "r", "--lr", "1e-3", "--max-steps", "7",
                 "--skip-bad-rows", "--no-progress"]) == 0
    sc = seen[0]
    assert (sc.model, sc.train, sc.max_steps, sc.skip_bad_rows, sc.val_fraction, sc.epochs) == ("m", "c.jsonl", 7, True,
                                                                                              0.05, 2.0)
    loop = sc.loop
    assert (loop.out, loop.lr, loop.progress, loop.batch_size, loop.seq_len, loop.min_lr) == ("r", 1e-3, False, 8, 512,
                                                                                              0.0)


# -- end to end -------------------------------------------------------------------------------------
def test_cli_run_lowers_the_answer_loss_and_exports_a_model_generate_runs(lm_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    flags = cli_flags({**SMALL, "max_steps": 24, "eval_every": 12, "val_fraction": 0.2, "lr": 1e-2})
    r = kogpt("sft", "--model", str(lm_dir), "--train", str(chat_file), "--out", str(out), *flags)
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "config.json").read_text())["sft"]
    assert info["train_conversations"] + info["val_conversations"] == len(chat_rows())
    vals = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if "val_loss" in ln]
    assert [v["step"] for v in vals] == [12, 24]
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] < info["base_val_loss"] - 1
    assert "val answer loss" in r.stdout and (out / "loss.png").exists()
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (out / "model").iterdir()}
    r = kogpt("generate", "--model", str(out / "model"), "--prompt", "안녕", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_losses(lm_dir, chat_file, tmp_path):
    flags = ["--model", str(lm_dir), "--train", str(chat_file),
             *cli_flags({**SMALL, "max_steps": 12, "eval_every": 4, "save_every": 4, "sample_tokens": 0})]
    ref = tmp_path / "ref"
    assert kogpt("sft", *flags, "--out", str(ref)).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", PAUSING_SAVES, "0.5", "sft", *flags, "--out", str(out)], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    _wait_for(proc, lambda: (out / "log.jsonl").exists() and 6 in losses(out))
    proc.kill()
    proc.wait()
    assert [torch.load(c, weights_only=True)["step"] for c in checkpoints(out / "checkpoints")] == [4]
    r = kogpt("sft", *flags, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from step 4" in r.stdout
    got, want = losses(out), losses(ref)
    assert [got[s] for s in range(1, 13)] == pytest.approx([want[s] for s in range(1, 13)], rel=1e-6)
    val = lambda run: [json.loads(ln)["val_loss"] for ln in (run / "log.jsonl").read_text().splitlines()  # noqa: E731
                       if "val_loss" in ln]
    assert val(out)[-2:] == pytest.approx(val(ref)[-2:], rel=1e-6)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(lm_dir, chat_file, tmp_path):
    flags = ["--model", str(lm_dir), "--train", str(chat_file),
             *cli_flags({**SMALL, "max_steps": 3, "eval_every": 3, "dtype": "float32", "sample_tokens": 0,
                             "dropout": 0.0})]  # the same dropout masks would need the same rows per process
    r = kogpt("sft", *flags, "--out", str(tmp_path / "one"))
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "kogpt", "sft", *flags, "--out", str(tmp_path / "two")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(b) == [1, 2, 3] and [b[s] for s in b] == pytest.approx([a[s] for s in b], rel=1e-5)
    val = [json.loads((tmp_path / d / "log.jsonl").read_text().splitlines()[-1])["val_loss"] for d in ("one", "two")]
    assert val[1] == pytest.approx(val[0], rel=1e-5)


def test_lora_sft_writes_a_peft_adapter_and_resumes_exactly(lm_dir, chat_file, tmp_path):
    """--lora-r: only the adapters train and are checkpointed; the adapter folder is what peft loads; a run
    resumed from its step-4 checkpoint ends with the uninterrupted run's losses and adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kogpt.core.layout import Layout
    from kogpt.training.sft import SFTConfig, sft

    kw = dict(SMALL, model=str(lm_dir), train=str(chat_file), max_steps=8, eval_every=4, save_every=4, keep_last=5,
              lr=1e-2, sample_tokens=0, lora_r=4, lora_alpha=8.0, grad_checkpoint=True)
    run = tmp_path / "run"
    sft(SFTConfig.from_settings(out=str(run), **kw))
    names = {p.name for p in (run / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names
    state = torch.load(checkpoints(run / "checkpoints")[-1], weights_only=True)
    assert state["model"] and all(k.endswith((".lora_A", ".lora_B")) for k in state["model"])
    vals = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if "val_loss" in ln]
    info = json.loads((run / "config.json").read_text())["sft"]
    assert vals[-1]["val_loss"] < info["base_val_loss"]  # the adapter learned something
    ids = torch.tensor([[5, 17, 300, 42, 9, 77]])
    with torch.no_grad():
        ours = load(lm_dir, Layout(torch.float32), adapter=run / "model")(ids)
        hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm_dir), run / "model").eval()
        assert (ours - hf(ids).logits).abs().max() < 1e-4
        assert (ours - load(lm_dir, Layout(torch.float32))(ids)).abs().max() > 1e-3
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    step4 = checkpoints(run / "checkpoints")[0]
    assert step4.name == "step-00000004.pt"
    (resumed / "checkpoints" / step4.name).write_bytes(step4.read_bytes())
    (resumed / "log.jsonl").write_text((run / "log.jsonl").read_text())
    sft(SFTConfig.from_settings(out=str(resumed), resume=True, **kw))
    a, b = losses(run), losses(resumed)
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]
    assert (resumed / "model" / "adapter_model.safetensors").read_bytes() == (
        run / "model" / "adapter_model.safetensors").read_bytes()

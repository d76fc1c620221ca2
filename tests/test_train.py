"""The training loop: schedule and config, overfitting, exact resume, kills, torchrun, HF export, errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from kogpt.cli import main
from kogpt.core.config import GPTConfig
from kogpt.errors import UserError
from kogpt.core.model import GPT
from kogpt.training.optim import flops_per_token, lr_at, param_groups
from kogpt.training.loss import LMLoss, linear_cross_entropy
from kogpt.training.run_log import RunLog, read_log
from kogpt.training.loop import train
from kogpt.training.config import TrainConfig, read_train_config
from kogpt.training.pretrain import LMObjective
from kogpt.training.state import checkpoints

from test_data import corpus, data_dir, make_tokenizer, tok_dir  # noqa: F401  (session fixtures: a prepared two-source corpus)

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(preset="tiny", seq_len=32, batch_size=4, grad_accum=2, max_steps=6, warmup_steps=2, lr=3e-3,
             eval_every=0, eval_batches=2, sample_tokens=8, log_every=1, save_every=3, keep_last=5,
             progress=False, peak_flops=1e12, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(data: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**SMALL, "data": str(data), "out": str(out), **kw})


def losses(out: Path) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def cli_flags(cfg: dict) -> list[str]:
    flags = []
    for k, v in cfg.items():
        flag = "--" + k.replace("_", "-")
        flags += ([flag] if v else [f"--no-{k.replace('_', '-')}"]) if isinstance(v, bool) else [flag, str(v)]
    return flags


def kogpt(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kogpt", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300, **kw)


@pytest.fixture(scope="module")
def run_a(data_dir, tmp_path_factory) -> Path:  # noqa: F811
    """An uninterrupted 6-step run with checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("run_a")
    result = train(small_config(data_dir, out))
    assert result.step == 6 and result.signal is None
    return out


# -- pieces -------------------------------------------------------------------------------------
def test_lr_schedule_warms_up_then_decays_to_min_lr():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    lrs = [lr_at(s, **kw) for s in range(16)]
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and lrs[4] == 1.0
    assert all(a > b for a, b in zip(lrs[4:14], lrs[5:14])) and lrs[9] == pytest.approx(0.55)
    assert lrs[14] == lrs[15] == 0.1


def test_weight_decay_groups_follow_nanogpt():
    model = GPT(GPTConfig.preset("tiny-gpt2"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.wte.weight for p in decay["params"])  # tied with lm_head, listed once
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_flops_per_token_is_6n_plus_attention():
    cfg = GPTConfig.preset("kogpt2-base-v2")
    n = cfg.num_params() - 1024 * 768
    assert flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_toml_config_with_flag_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('data = "d"\nlr = 1e-3\nmax_steps = 50\ncompile = true\n[weights]\nkowiki = 2\n', encoding="utf-8")
    cfg = read_train_config(path, {"max_steps": 7})
    assert (cfg.data, cfg.lr, cfg.max_steps, cfg.compile, cfg.weights) == ("d", 1e-3, 7, True, {"kowiki": 2})
    path.write_text("lerning_rate = 1e-3\n", encoding="utf-8")
    with pytest.raises(UserError, match="unknown key 'lerning_rate'"):
        read_train_config(path)
    path.write_text('max_steps = "ten"\n', encoding="utf-8")
    with pytest.raises(UserError, match="max_steps must be a int"):
        read_train_config(path)


def test_every_setting_is_one_train_flag():
    from kogpt.cli.train import GROUPS
    from kogpt.training.config import FIELDS

    assert sorted(" ".join(GROUPS.values()).split()) == sorted(FIELDS)


# -- the loop -----------------------------------------------------------------------------------
class OneBatch(LMObjective):
    """The same batch at every step: an objective plugged into the loop (as finetuning's is)."""

    def micro_batches(self, step, n_micro):
        return super().micro_batches(0, n_micro)


def test_overfits_one_batch(data_dir, tmp_path):  # noqa: F811
    cfg = small_config(data_dir, tmp_path, max_steps=60, warmup_steps=5, lr=1e-2, grad_accum=1, save_every=0,
                       sample_tokens=0)
    train(cfg, objective=OneBatch(cfg, json.loads((data_dir / "meta.json").read_text()), _env()))
    log = losses(tmp_path)
    assert log[1] > 6.5 and log[60] < 0.5, log  # from ln(1000) ≈ 6.9 to memorized


def _env():
    from kogpt.training.loop import setup_env

    return setup_env("cpu")


def test_run_folder(run_a):
    log = [json.loads(ln) for ln in (run_a / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    val = log[-1]
    assert val["step"] == 6 and math.log(1000) + 1 > val["val_loss"] > 3  # learning, not yet memorizing
    assert val["val_ppl"] == pytest.approx(math.exp(val["val_loss"]))
    assert 0 < val["val_bpb"] < val["val_loss"] / math.log(2)  # more than one byte per token
    assert set(val["val_loss_by_source"]) == {"reviews", "wiki"}
    assert isinstance(val["sample"], str) and val["sample"].startswith("대한민국은")
    assert all(0 < r["mfu"] and r["tok_s"] > 0 for r in log if "loss" in r)
    assert (run_a / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in checkpoints(run_a / "checkpoints")] == ["step-00000003.pt", "step-00000006.pt"]
    assert json.loads((run_a / "config.json").read_text())["train"]["max_steps"] == 6


def test_resume_gives_the_same_next_step_loss(run_a, data_dir, tmp_path):  # noqa: F811
    import shutil

    shutil.copytree(run_a / "checkpoints", tmp_path / "checkpoints")
    shutil.copy(run_a / "log.jsonl", tmp_path)  # holds steps 1-6: resuming drops 4-6 and logs them again
    (tmp_path / "checkpoints" / "step-00000006.pt").unlink()
    result = train(small_config(data_dir, tmp_path, resume=True))
    assert result.step == 6
    a, b = losses(run_a), losses(tmp_path)
    assert set(b) == {1, 2, 3, 4, 5, 6}  # the log keeps steps 1-3 and continues
    assert [b[s] for s in (4, 5, 6)] == [a[s] for s in (4, 5, 6)]  # exactly


def test_dropout_trains_with_masks_validates_without_and_resumes_exactly(data_dir, tmp_path):  # noqa: F811
    kw = dict(max_steps=4, save_every=2, eval_every=4, sample_tokens=0, dropout=0.5,
              peak_flops=0.0)  # measured after the resume restores the RNG, which it must leave alone
    train(small_config(data_dir, tmp_path / "a", **kw))
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")
    (tmp_path / "b" / "checkpoints" / "step-00000004.pt").unlink()
    train(small_config(data_dir, tmp_path / "b", resume=True, **kw))
    assert [losses(tmp_path / "b")[s] for s in (3, 4)] == [losses(tmp_path / "a")[s] for s in (3, 4)]
    cfg = small_config(data_dir, tmp_path / "c", **kw)
    objective = LMObjective(cfg, json.loads((data_dir / "meta.json").read_text()), _env())
    model = objective.start(cfg, objective.env, None).train()
    batch = objective.micro_batches(0, 1)[0]
    assert LMLoss(model)(batch).item() != LMLoss(model)(batch).item()  # masked while training
    first, second = objective.evaluate(LMLoss(model), nullcontext()), objective.evaluate(LMLoss(model), nullcontext())
    assert first["val_loss"] == second["val_loss"] and model.training  # validation without, then back


def test_keep_last_deletes_old_checkpoints(data_dir, tmp_path):  # noqa: F811
    train(small_config(data_dir, tmp_path, max_steps=5, save_every=1, keep_last=2, sample_tokens=0))
    assert [p.name for p in checkpoints(tmp_path / "checkpoints")] == ["step-00000004.pt", "step-00000005.pt"]


def test_shape_flags_override_the_preset_and_resume(data_dir, tmp_path):  # noqa: F811
    shape = dict(n_layer=2, n_embd=48, n_head=3, sample_tokens=0, save_every=2)
    train(small_config(data_dir, tmp_path, max_steps=2, **shape))
    hf = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (hf["n_layer"], hf["n_embd"], hf["n_head"], hf["vocab_size"]) == (2, 48, 3, 1000)
    assert train(small_config(data_dir, tmp_path, max_steps=3, resume=True, **shape)).step == 3  # the same command
    with pytest.raises(UserError, match="another shape"):
        train(small_config(data_dir, tmp_path, max_steps=4, resume=True, **{**shape, "n_layer": 3}))
    with pytest.raises(UserError, match="n_embd .* divisible"):
        train(small_config(data_dir, tmp_path / "x", n_embd=50, n_head=3))


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_fresh_run_refuses_an_out_with_an_earlier_run(run_a, data_dir, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    before = files_of(run)
    with pytest.raises(UserError, match="holds an earlier run .*--resume.*--overwrite"):
        train(small_config(data_dir, run, max_steps=2))
    assert files_of(run) == before  # nothing was touched
    with pytest.raises(UserError, match="not both"):
        train(small_config(data_dir, run, resume=True, overwrite=True))
    assert files_of(run) == before

    # --overwrite: the earlier run's checkpoints, model and log go; pruning sees the new run only
    result = train(small_config(data_dir, run, max_steps=2, save_every=1, keep_last=5, overwrite=True,
                                sample_tokens=0))
    assert result.step == 2 and result.model_dir == run / "model"
    assert [p.name for p in checkpoints(run / "checkpoints")] == ["step-00000001.pt", "step-00000002.pt"]
    assert set(losses(run)) == {1, 2}
    assert (run / "model" / "model.safetensors").read_bytes() != before["model/model.safetensors"]


def test_resume_at_or_past_max_steps_is_clear(run_a, data_dir, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    before = files_of(run)
    with pytest.raises(UserError, match="at step 6, past max_steps 4"):
        train(small_config(data_dir, run, max_steps=4, resume=True))
    result = train(small_config(data_dir, run, resume=True))  # the finished run's own command, again
    assert (result.step, result.model_dir, result.signal) == (6, run / "model", None)
    assert "nothing to train" in capsys.readouterr().out
    assert files_of(run) == before
    # killed between the last checkpoint and the export: --resume writes the model from the checkpoint
    shutil.rmtree(run / "model")
    result = train(small_config(data_dir, run, resume=True))
    assert result.model_dir == run / "model" and set(losses(run)) == set(losses(run_a))
    assert (run / "model" / "model.safetensors").read_bytes() == before["model/model.safetensors"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_resume_skips_a_torn_last_log_line(run_a, data_dir, tmp_path):  # noqa: F811
    shutil.copytree(run_a / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "step-00000006.pt").unlink()
    torn = '{"step": 4, "loss": 1.5, "sample": "대한민국'.encode()[:-1]  # killed mid-line, mid-character
    (tmp_path / "log.jsonl").write_bytes((run_a / "log.jsonl").read_bytes() + torn)
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [r["step"] for r in read_log(run_a / "log.jsonl")]
    result = train(small_config(data_dir, tmp_path, resume=True))
    assert result.step == 6
    assert losses(tmp_path) == pytest.approx(losses(run_a), rel=1e-6)


def test_run_log_appends_whole_lines(tmp_path):
    log = RunLog(tmp_path, enabled=True, resume_step=None)
    log.write(step=1, loss=2.0, sample="한국어 " * 2000)  # a long line: one write() all the same
    with open(tmp_path / "log.jsonl", "ab") as f:
        f.write(b'{"step": 2, "lo')  # a torn line
    RunLog(tmp_path, enabled=True, resume_step=5)  # resuming drops it
    log.write(step=3, loss=1.0)
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [1, 3]
    assert len((tmp_path / "log.jsonl").read_text(encoding="utf-8").splitlines()) == 2


@pytest.mark.parametrize("flags, words", [
    (["--device", "foo"], ["device must be cpu, cuda, cuda:N or auto", "'foo'"]),
    (["--device", "cuda:x"], ["device must be"]),
    (["--lr", "-1"], ["lr must be > 0"]),
    (["--lr", "nan"], ["lr must be > 0"]),
    (["--lr", "inf"], ["lr must be > 0"]),
    (["--beta2", "1"], ["beta2 must be in [0, 1)"]),
    (["--dropout", "1"], ["dropout must be in [0, 1)"]),
    (["--warmup-steps", "-1"], ["warmup_steps must be >= 0"]),
    (["--seed", "-1"], ["seed must be in"]),
    (["--weight", "wiki=inf"], ["--weight wiki=inf", "finite"]),
    (["--weight", "wiki=nan"], ["finite"]),
    (["--resume", "--overwrite"], ["not both"]),
])
def test_bad_train_flags_fail_before_any_work(data_dir, tmp_path, capsys, flags, words):  # noqa: F811
    out = tmp_path / "run"
    assert main(["train", "--data", str(data_dir), "--out", str(out), "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err
    assert not out.exists()


def test_bad_train_devices_configs_and_outs(data_dir, tmp_path, capsys):  # noqa: F811
    def one_line_error(argv, *words):
        assert main(["train", "--data", str(data_dir), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), err

    if not torch.cuda.is_available():
        one_line_error(["--out", str(tmp_path / "r"), "--device", "cuda"], "no CUDA device")
        one_line_error(["--out", str(tmp_path / "r"), "--device", "cuda:1"], "no CUDA device")
    (tmp_path / "latin1.toml").write_bytes("# café\nlr = 1e-3\n".encode("latin-1"))
    one_line_error(["--config", str(tmp_path / "latin1.toml"), "--out", str(tmp_path / "r")], "latin1.toml",
                   "not UTF-8")
    (tmp_path / "bool.toml").write_bytes(b"[weights]\nwiki = true\n")
    one_line_error(["--config", str(tmp_path / "bool.toml"), "--out", str(tmp_path / "r")], "weights must be a dict")
    (tmp_path / "file").write_text("x")
    one_line_error(["--out", str(tmp_path / "file"), "--device", "cpu"], "--out", "is a file")
    one_line_error(["--out", str(tmp_path / "file" / "run"), "--device", "cpu"], "is a file, not a folder")
    assert not (tmp_path / "r").exists()


def test_training_sample_follows_the_start_token_rule(data_dir, monkeypatch):  # noqa: F811
    import kogpt.generation.engine
    from kogpt.training.pretrain import _sample
    from kogpt.text.tokenizer import Tokenizer

    prompts = []

    def fake_generate(model, ps, **kw):
        prompts.append((ps[0], kw["eos_ids"]))
        return [[]]

    monkeypatch.setattr(kogpt.generation.engine, "generate_ids", fake_generate)
    model, env, cfg = GPT(GPTConfig.preset("tiny-gpt2")), _env(), TrainConfig(sample_prompt="대한민국은")
    folder = data_dir / "tokenizer"
    for tok in (Tokenizer.from_dir(folder), Tokenizer.from_dir(folder, bos_token="<s>"),
                Tokenizer.from_dir(folder, bos_token=None, eos_token=None)):
        assert _sample(model, tok, cfg, env) == "대한민국은"
        ids = tok.encode("대한민국은")
        assert prompts[-1] == ([tok.start_id, *ids] if tok.start_id is not None else ids,
                               [tok.eos_id] if tok.eos_id is not None else [])
    assert [p[0][0] for p in prompts[:2]] == [1, 0]  # </s> (bos = eos), then <s> once it is the BOS


@torch.no_grad()
def test_final_folder_loads_in_transformers_with_the_same_logits(run_a):
    import transformers

    from kogpt.hf.load import load

    folder = run_a / "model"
    ours = load(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tok.eos_token == "</s>" and hf_tok.decode(hf_tok("안녕하세요")["input_ids"]) == "안녕하세요"
    state = torch.load(run_a / "checkpoints" / "step-00000006.pt", weights_only=True)  # the same weights
    torch.testing.assert_close(state["model"]["h.0.attn.qkv.weight"], ours.h[0].attn.qkv.weight)


def test_init_from_continues_a_trained_model(run_a, data_dir, tmp_path):  # noqa: F811
    train(small_config(data_dir, tmp_path, init_from=str(run_a / "model"), max_steps=1, warmup_steps=0,
                       sample_tokens=0, lr=1e-5))
    first, a = losses(tmp_path)[1], losses(run_a)
    assert abs(first - a[6]) < 0.2 and first < a[1] - 0.3  # starts where run_a ended, below a fresh init


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_cross_entropy_equals_autograd(bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(70, 16, generator=g, requires_grad=True)  # 70 rows: two full chunks and a partial one
    head = torch.nn.Linear(16, 50, bias=bias)
    t = torch.randint(0, 50, (70,), generator=g)
    loss = linear_cross_entropy(h, head, t)
    grads = torch.autograd.grad(loss * 3, [h, *head.parameters()])  # a non-unit upstream gradient
    ref = torch.nn.functional.cross_entropy(head(h), t)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(grads, torch.autograd.grad(ref * 3, [h, *head.parameters()])):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        rows = linear_cross_entropy(h, head, t, reduction="none")
    torch.testing.assert_close(rows, torch.nn.functional.cross_entropy(head(h), t, reduction="none"))


def test_lm_loss_under_bf16_autocast_matches_the_plain_autocast_path():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny-gpt2"))
    batch = torch.randint(0, 1024, (3, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = LMLoss(model)(batch)
        (g_ours,) = torch.autograd.grad(ours, [model.wte.weight])
        ref = torch.nn.functional.cross_entropy(model(batch[:, :-1]).float().flatten(0, 1), batch[:, 1:].flatten())
        (g_ref,) = torch.autograd.grad(ref, [model.wte.weight])
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)
    torch.testing.assert_close(g_ours, g_ref, atol=2e-4, rtol=2e-2)
    assert LMLoss(model)(batch, reduction="none").shape == (3,)


# -- processes: kills, signals, torchrun, errors ------------------------------------------------
# `kogpt train` whose checkpoint saves pause between the temp write and the rename (argv[1] seconds),
# so a test can kill the process mid-save; the product code has no test hook for it
PAUSING_SAVES = """
import sys, time
import kogpt.training.state as ts
from kogpt.cli import main

real = ts.atomic_write

def atomic_write(path, write):
    def write_then_pause(tmp):
        write(tmp)
        print(f"checkpoint {path.name}: paused before rename", flush=True)
        time.sleep(float(sys.argv[1]))
    real(path, write_then_pause)

ts.atomic_write = atomic_write
sys.exit(main(sys.argv[2:]))
"""


def _spawn(data: Path, out: Path, pause: float = 0.0, **kw) -> subprocess.Popen:
    cfg = {**SMALL, "data": data, "out": out, **kw}
    return subprocess.Popen([sys.executable, "-c", PAUSING_SAVES, str(pause), "train", *cli_flags(cfg)], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for(proc: subprocess.Popen, cond, timeout=120):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"training ended before the kill: {proc.stderr.read()}"
        assert time.time() - t0 < timeout
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_mid_run_and_mid_save_then_resume(data_dir, tmp_path):  # noqa: F811
    kw = dict(max_steps=12, save_every=4, sample_tokens=0)
    ref = tmp_path / "ref"
    assert kogpt("train", *cli_flags({**SMALL, "data": data_dir, "out": ref, **kw})).returncode == 0

    # mid-save: every save pauses between its temp write and the rename; kill the second (step 8) there
    out = tmp_path / "mid_save"
    proc = _spawn(data_dir, out, pause=2, **kw)
    paused = []
    _wait_for(proc, lambda: paused.append(proc.stdout.readline()) or sum("paused" in ln for ln in paused) == 2)
    proc.kill()
    proc.wait()
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["step-00000004.pt"]
    assert list((out / "checkpoints").glob(".step-00000008.pt.*.tmp"))  # the half-done save

    # mid-run: saves pause briefly; kill as soon as step 6 is logged (during steps 6-8 or the step-8 save)
    out2 = tmp_path / "mid_run"
    proc = _spawn(data_dir, out2, pause=0.5, **kw)
    _wait_for(proc, lambda: (out2 / "log.jsonl").exists() and 6 in losses(out2))
    proc.kill()
    proc.wait()

    for run in (out, out2):
        for ckpt in checkpoints(run / "checkpoints"):  # no checkpoint is corrupt
            assert torch.load(ckpt, weights_only=True)["step"] in (4, 8)
        r = kogpt("train", *cli_flags({**SMALL, "data": data_dir, "out": run, **kw}), "--resume")
        assert r.returncode == 0, r.stderr
        assert "resumed from step" in r.stdout
        assert not list((run / "checkpoints").glob("*.tmp"))
        got, want = losses(run), losses(ref)
        assert set(got) == set(range(1, 13))
        assert [got[s] for s in range(1, 13)] == pytest.approx([want[s] for s in range(1, 13)], rel=1e-6)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits(data_dir, tmp_path):  # noqa: F811
    proc = _spawn(data_dir, tmp_path, pause=0.3, max_steps=1000, save_every=0, sample_tokens=0)
    _wait_for(proc, lambda: (tmp_path / "log.jsonl").exists() and len(losses(tmp_path)) >= 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    (ckpt,) = checkpoints(tmp_path / "checkpoints")
    step = torch.load(ckpt, weights_only=True)["step"]
    assert step == max(losses(tmp_path)) and step < 1000
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(data_dir, tmp_path, fsdp):  # noqa: F811
    kw = dict(max_steps=4, dtype="float32", save_every=0, sample_tokens=4, eval_batches=4, fsdp=fsdp)
    one = tmp_path / "one"
    r = kogpt("train", *cli_flags({**SMALL, "data": data_dir, "out": one, **kw}))
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "kogpt", "train", *cli_flags({**SMALL, "data": data_dir, "out": two, **kw})],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert sorted(b) == [1, 2, 3, 4]
    assert [b[s] for s in b] == pytest.approx([a[s] for s in b], rel=1e-5)
    val = [json.loads((d / "log.jsonl").read_text().splitlines()[-1]) for d in (one, two)]
    assert val[1]["val_loss"] == pytest.approx(val[0]["val_loss"], rel=1e-5)
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    assert (two / "model" / "model.safetensors").exists()  # rank 0 exported the model


def _one_line_error(r: subprocess.CompletedProcess, *words: str):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), r.stderr


def test_bad_inputs_give_one_line_errors(data_dir, tok_dir, run_a, tmp_path):  # noqa: F811
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    _one_line_error(kogpt("prepare", "--input", str(tmp_path / "empty.txt"), "--tokenizer", str(tok_dir),
                          "--out", str(tmp_path / "d")), "corpus is empty")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00broken")
    _one_line_error(kogpt("prepare", "--input", str(tmp_path / "bad.txt"), "--tokenizer", str(tok_dir),
                          "--out", str(tmp_path / "d")), "bad.txt is not UTF-8")
    (tmp_path / "typo.toml").write_text(f'data = "{data_dir}"\nmax_step = 3\n', encoding="utf-8")
    _one_line_error(kogpt("train", "--config", str(tmp_path / "typo.toml")), "unknown key 'max_step'",
                    "did you mean 'max_steps'")
    small = GPT(GPTConfig.preset("tiny-gpt2").replace(vocab_size=500))
    from kogpt.hf.save import save_model

    save_model(small, tmp_path / "small")
    _one_line_error(kogpt("train", "--data", str(data_dir), "--init-from", str(tmp_path / "small"),
                          "--out", str(tmp_path / "r")), "vocab mismatch", "500", "1000")
    other = tmp_path / "other"  # a model of the right size whose own tokenizer is not the data's
    save_model(GPT(GPTConfig.preset("tiny-gpt2").replace(vocab_size=1000)), other)
    make_tokenizer([data_dir / "tokenizer" / "tokenizer.json"], other, vocab_size=600)  # any other text
    _one_line_error(kogpt("train", "--data", str(data_dir), "--init-from", str(other), "--out", str(tmp_path / "r")),
                    "vocab mismatch", "own tokenizer")
    from kogpt.core.classifier import Classifier, Head

    save_model(Classifier(GPT(GPTConfig.preset("tiny-gpt2").replace(vocab_size=1000)), 2), tmp_path / "clf",
               Head("nsmc", ("0", "1")))
    _one_line_error(kogpt("train", "--data", str(data_dir), "--init-from", str(tmp_path / "clf"),
                          "--out", str(tmp_path / "r")), "finetuned classifier", "--init-from takes a language model")
    _one_line_error(kogpt("train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")),
                    "meta.json is missing")

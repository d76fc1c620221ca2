"""Memory-lean training. LoRA runs (--lora-r): `kogpt train --init-from` and `kogpt finetune` train adapters (and a
head) on a frozen bf16 base, checkpoint only what trains, write a PEFT adapter folder that peft loads with kogpt's
logits, and resume exactly. Gradient checkpointing and the frozen head's skipped gradient change no gradient."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_hf_model, shared_path
from kogpt.core.config import GPTConfig
from kogpt.core.layout import Layout
from kogpt.core.model import GPT
from kogpt.errors import UserError
from kogpt.hf.load import load
from kogpt.cli import main
from kogpt.hf.folder import read_head
from kogpt.hf.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_head
from kogpt.text.tokenizer import Tokenizer
from kogpt.training.config import TrainConfig
from kogpt.training.finetune import FinetuneConfig, finetune
from kogpt.training.lora import load_lora_base
from kogpt.training.loss import LMLoss, linear_cross_entropy
from kogpt.training.loop import train
from kogpt.training.state import checkpoints, load_latest
from test_data import corpus, data_dir, make_tokenizer, tok_dir  # noqa: F401  (session fixtures: a prepared corpus)
from test_finetune import TINY, lm_folder, log_of
from test_lora import IDS, max_diff
from test_train import ROOT, SMALL, cli_flags, kogpt, losses, small_config

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")
FP32 = Layout(torch.float32)
LORA = dict(lora_r=4, lora_alpha=8.0, lr=1e-2, sample_tokens=4)


def base_folder(root: Path, family: str, tokenizer_dir: Path) -> Path:
    """A random-init transformers LM (default init scale) with the data's tokenizer: what --init-from continues."""
    folder = root / f"base-{family}"
    make_hf_model(family, initializer_range=0.02).save_pretrained(folder)
    Tokenizer.from_dir(tokenizer_dir).save(folder)
    return folder


@pytest.fixture(scope="module", params=["gpt2", "gptj"])
def lora_run(request, data_dir, tmp_path_factory):  # noqa: F811
    """(base folder, run folder) of an uninterrupted 6-step LoRA run with checkpoints at steps 3 and 6."""
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    base = base_folder(root, request.param, data_dir / "tokenizer")
    result = train(small_config(data_dir, root / "run", init_from=str(base), **LORA))
    assert result.step == 6 and result.signal is None
    return base, root / "run"


def test_lora_run_trains_only_the_adapters_and_writes_a_peft_folder(lora_run):
    from transformers import AutoModelForCausalLM

    base, run = lora_run
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "tokenizer.json"} <= {p.name for p in (run / "model").iterdir()}
    assert not (run / "model" / "model.safetensors").exists()
    log = losses(run)
    assert log[6] < log[1]  # it learns
    state = load_latest(run / "checkpoints")
    adapters = [k for k in state["model"] if k.endswith((".lora_A", ".lora_B"))]
    assert len(adapters) == 2 * 4 * 2  # A and B of 4 linears in 2 layers
    assert sorted(state["model"]) == sorted(adapters)  # the frozen base is --init-from's, not checkpointed
    assert len(state["optimizer"]["state"]) == len(adapters)  # only the adapters are in the optimizer
    assert all(state["model"][k].dtype == torch.float32 for k in adapters)
    with torch.no_grad():
        ours = load(base, FP32, adapter=run / "model")(IDS)
        hf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run / "model").eval()
        assert max_diff(ours, load(base, FP32)(IDS)) > 1e-3  # the trained adapter matters
        assert max_diff(ours, hf(IDS).logits) < 1e-4


def test_lora_run_resumes_exactly(lora_run, data_dir, tmp_path):  # noqa: F811
    base, run = lora_run
    shutil.copytree(run / "checkpoints", tmp_path / "checkpoints")
    shutil.copy(run / "log.jsonl", tmp_path)
    (tmp_path / "checkpoints" / "step-00000006.pt").unlink()
    result = train(small_config(data_dir, tmp_path, init_from=str(base), resume=True, **LORA))
    assert result.step == 6 and [p.name for p in checkpoints(tmp_path / "checkpoints")][-1] == "step-00000006.pt"
    a, b = losses(run), losses(tmp_path)
    assert [b[s] for s in (4, 5, 6)] == [a[s] for s in (4, 5, 6)]  # exactly
    assert (tmp_path / "model" / ADAPTER_WEIGHTS).read_bytes() == (run / "model" / ADAPTER_WEIGHTS).read_bytes()


@pytest.mark.slow
def test_torchrun_two_processes_match_one(data_dir, tmp_path):  # noqa: F811
    """The CLI flags, under torchrun DDP: two processes train GPT-J's adapters as one does."""
    base = base_folder(tmp_path, "gptj", data_dir / "tokenizer")
    kw = dict(SMALL, data=data_dir, init_from=base, max_steps=3, dtype="float32", save_every=0, sample_tokens=0,
              eval_batches=4, lora_r=4, lora_alpha=8.0, lora_targets="attn", lr=1e-2)
    one, two = tmp_path / "one", tmp_path / "two"
    r = kogpt("train", *cli_flags({**kw, "out": one}))
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "kogpt", "train", *cli_flags({**kw, "out": two})],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert sorted(b) == [1, 2, 3] and [b[s] for s in b] == pytest.approx([a[s] for s in b], rel=1e-4)
    assert json.loads((two / "model" / ADAPTER_CONFIG).read_text())["target_modules"] == json.loads(
        (one / "model" / ADAPTER_CONFIG).read_text())["target_modules"]


def test_bad_lora_settings_fail_before_any_work(data_dir, tmp_path):  # noqa: F811
    with pytest.raises(UserError, match="--init-from"):
        train(small_config(data_dir, tmp_path / "a", lora_r=4))
    with pytest.raises(UserError, match="--lora-targets"):
        train(small_config(data_dir, tmp_path / "b", init_from="x", lora_r=4, lora_targets="lm_head"))
    with pytest.raises(UserError, match="lora_alpha must be > 0"):
        train(small_config(data_dir, tmp_path / "c", init_from="x", lora_r=4, lora_alpha=0.0))
    with pytest.raises(UserError, match="--fsdp"):
        train(small_config(data_dir, tmp_path / "d", init_from="x", lora_r=4, fsdp=True))
    assert not any(tmp_path.iterdir())


def test_lora_finetune_writes_a_seq_cls_adapter(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from kogpt.text.bpe import train_tokenizer

    with open(shared_path("bench", "nsmc", "ratings_train.txt"), encoding="utf-8") as f:
        rows = [next(f) for _ in range(201)]
    (tmp_path / "nsmc.tsv").write_text("".join(rows), encoding="utf-8")
    (tmp_path / "lines.txt").write_text("\n".join(r.split("\t")[1] for r in rows[1:]), encoding="utf-8")
    base = lm_folder(tmp_path, "gptj", train_tokenizer([tmp_path / "lines.txt"], 1000, show_progress=False))
    run = tmp_path / "run"
    finetune(FinetuneConfig.from_settings(model=str(base), task="nsmc", train=str(tmp_path / "nsmc.tsv"), out=str(run),
                                          max_steps=4, eval_every=2, dropout=0.0, lora_r=4, lora_targets="q,v",
                                          **TINY))
    config = json.loads((run / "model" / ADAPTER_CONFIG).read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    assert sorted(config["target_modules"]) == ["attn.q_proj", "attn.v_proj"]
    assert any("val_accuracy" in r for r in log_of(run))
    state = load_latest(run / "checkpoints")
    trained = {k for k in state["model"] if k.endswith((".lora_A", ".lora_B"))} | {"score.weight"}
    assert len(state["optimizer"]["state"]) == len(trained) and state["model"]["score.weight"].dtype == torch.float32
    ids = IDS.clone()
    ids[0, -3:] = 3  # right padding
    with torch.no_grad():
        ours = load(base, FP32, adapter=run / "model")(ids)
        hf = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
        assert max_diff(ours, peft.PeftModel.from_pretrained(hf, run / "model").eval()(ids).logits) < 1e-4
    # merged, it is a classifier folder that knows its task, as a full finetune's model/ is
    assert main(["merge", "--model", str(base), "--adapter", str(run / "model"), "--out", str(tmp_path / "m")]) == 0
    head = read_head(tmp_path / "m")[0]
    assert (head.task, head.labels, head.seq_len) == ("nsmc", read_adapter_head(run / "model")[0].labels, 64)
    with torch.no_grad():
        assert max_diff(load(tmp_path / "m", FP32)(ids), ours) < 1e-4
    data = ["--task", "nsmc", "--data", str(tmp_path / "nsmc.tsv"), "--limit", "20", "--dtype", "fp32"]
    assert main(["eval", "--model", str(tmp_path / "m"), *data, "--output", str(tmp_path / "merged.json")]) == 0
    # unmerged: kogpt eval --adapter scores with the adapter's head, as the merged folder does
    assert main(["eval", "--model", str(base), "--adapter", str(run / "model"), *data,
                 "--output", str(tmp_path / "adapter.json")]) == 0
    merged, unmerged = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("merged", "adapter"))
    assert unmerged["metrics"] == merged["metrics"]
    for ours, theirs in zip(unmerged["predictions"], merged["predictions"], strict=True):
        assert ours["pred"] == theirs["pred"] and ours["logprobs"] == pytest.approx(theirs["logprobs"], abs=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "gptj"])
def test_the_lora_base_is_frozen_bf16_and_only_adapters_train(family, tmp_path):
    make_hf_model(family).save_pretrained(tmp_path)
    model = load_lora_base(tmp_path, TrainConfig(lora_r=4, lora_targets="attn"), "cpu")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith((".lora_A", ".lora_B")) for n in trained)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trained)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in trained and p.dim() == 2)


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-gptj"])
def test_gradient_checkpointing_changes_no_gradient(preset):
    """Recomputed blocks give the same loss and gradients, dropout masks included (the RNG is replayed)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(preset))
    model.set_dropout(0.1)
    model.train()
    batch = torch.randint(0, model.config.vocab_size, (2, 17))
    runs = []
    for recompute in (False, True):
        model.grad_checkpoint = recompute
        model.zero_grad()
        torch.manual_seed(1)
        loss = LMLoss(model)(batch)
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = runs
    assert torch.equal(a, b) and ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=0, atol=1e-6, msg=n)


def test_grad_checkpoint_flag_reaches_the_model_and_trains_alike(data_dir, tmp_path, monkeypatch):  # noqa: F811
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr("kogpt.core.model.checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(max_steps=3, sample_tokens=0, dtype="float32")
    train(small_config(data_dir, tmp_path / "plain", **kw))
    assert not calls
    train(small_config(data_dir, tmp_path / "recomputed", grad_checkpoint=True, **kw))
    assert len(calls) == 3 * 2 * 4  # 4 blocks per forward, 2 micro-batches per step, 3 steps
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "recomputed")
    assert [b[s] for s in (1, 2, 3)] == pytest.approx([a[s] for s in (1, 2, 3)], rel=1e-5)


def test_a_frozen_head_gets_no_weight_gradient_and_the_same_input_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    h = torch.randn(12, 16)
    targets = torch.randint(0, 50, (12,))
    grads = []
    for frozen in (False, True):
        head.requires_grad_(not frozen)
        head.zero_grad()
        x = h.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            linear_cross_entropy(x, head, targets).backward()
        grads.append(x.grad)
        assert (head.weight.grad is None) == frozen and (head.bias.grad is None) == frozen
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("family", ["gpt2", "gptj"])
def test_the_finetune_memory_benchmark_compares_like_with_like(family, tmp_path):
    """benchmarks/finetune_memory.py: kogpt's LoRA row and the transformers + peft row train the same number of
    parameters (the same targets and rank) from the same loss, and both report a step time and a peak RSS."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ftmem", ROOT / "benchmarks" / "finetune_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    hf = make_hf_model(family, initializer_range=0.02)  # calm logits: bf16 rounding stays small
    hf.save_pretrained(tmp_path)
    kw = dict(batch=2, seq=16, r=4, steps=1, warmup=1, threads=1, vocab=hf.config.vocab_size, grad_checkpoint=True)
    ours, theirs = (bench.measure(which, tmp_path, "-", **kw) for which in ("kogpt-lora", "hf-peft"))
    assert ours["trainable"] == theirs["trainable"] > 0
    assert ours["first_loss"] == pytest.approx(theirs["first_loss"], rel=5e-3)
    assert all(m["step_s"] > 0 and m["peak_rss_gb"] >= m["load_peak_rss_gb"] > 0 for m in (ours, theirs))

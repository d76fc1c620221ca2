"""`kogpt serve` with clients nobody here wrote, each against a real `kogpt serve` process on 127.0.0.1:
EleutherAI's lm-evaluation-harness (`local-completions`, token ids and strings) must reproduce
`kogpt eval --task nsmc --shots 0` on the same rows; schemathesis fuzzes the served /openapi.json with
every check; the official openai client sends token-id prompts and echo + logprobs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from conftest import make_hf_model
from kogpt.text.tokenizer import Tokenizer
from test_serve import _free_port, _up, wait_for

MINI = Path(__file__).resolve().parents[1] / "kogpt" / "models" / "kogpt-mini"
NSMC_SAMPLE = Path(__file__).parent / "data" / "nsmc_sample.txt"  # 32 rows of NSMC's ratings_train.txt (CC0)
OFFLINE = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")

# the nsmc-v1 prompt of kogpt/evaluation/tasks/nsmc.py, as an lm-eval task (docs/serving.md shows the same)
TASK_YAML = """\
task: nsmc_kogpt
dataset_path: csv
dataset_kwargs:
  data_files:
    test: {data}
  sep: "\\t"
  quoting: 3
  na_filter: false
test_split: test
output_type: multiple_choice
doc_to_text: "리뷰: {{{{document}}}}\\n감정:"
doc_to_choice: ["부정", "긍정"]
doc_to_target: label
metric_list:
  - metric: acc
"""


def serve(folder: Path, log: Path, *flags: str):
    """`kogpt serve` in a subprocess on a free port: (process, base URL) once /health answers."""
    port = _free_port()
    cmd = [sys.executable, "-m", "kogpt", "serve", "--model", str(folder), "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=dict(os.environ, **OFFLINE))
    url = f"http://127.0.0.1:{port}"
    if not wait_for(lambda: proc.poll() is None and _up(url), timeout=90):
        proc.kill()
        pytest.fail(f"kogpt serve did not start:\n{log.read_text()}")
    return proc, url


def stop(proc) -> None:
    proc.terminate()
    proc.wait(15)


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory):
    """kogpt-mini whose HF tokenizer adds the start token </s>, as `kogpt eval` scores every text after it.

    kogpt's own tokenizer never adds it on encode (add_special_tokens=False), so the server reads the
    same ids; lm-eval's `add_bos_token=True` then sends [</s>, prompt…] like kogpt eval's contexts.
    """
    import tokenizers
    from tokenizers import processors

    folder = tmp_path_factory.mktemp("mini") / "kogpt-mini"
    shutil.copytree(MINI, folder)
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    start = Tokenizer.from_dir(folder)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{start.bos_token} $A", special_tokens=[(start.bos_token, start.start_id)])
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def mini_url(mini_dir, tmp_path_factory):
    proc, url = serve(mini_dir, tmp_path_factory.mktemp("log") / "serve.log", "--dtype", "fp32",
                      "--served-model-name", "kogpt")
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def kogpt_eval(mini_dir, tmp_path_factory):
    """`kogpt eval --task nsmc --shots 0` on the sample rows: its JSON result, per-example predictions included."""
    out = tmp_path_factory.mktemp("eval") / "nsmc.json"
    subprocess.run([sys.executable, "-m", "kogpt", "eval", "--model", str(mini_dir), "--dtype", "fp32",
                    "--task", "nsmc", "--shots", "0", "--data", str(NSMC_SAMPLE), "--output", str(out)],
                   check=True, env=dict(os.environ, **OFFLINE), capture_output=True)
    return json.loads(out.read_text())


@pytest.mark.parametrize("tokenized", [True, False], ids=["token-ids", "strings"])
def test_lm_eval_local_completions_equals_kogpt_eval(mini_dir, mini_url, kogpt_eval, tmp_path, monkeypatch,
                                                     tokenized):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    import lm_eval
    from lm_eval.tasks import TaskManager

    (tmp_path / "nsmc_kogpt.yaml").write_text(TASK_YAML.format(data=NSMC_SAMPLE), encoding="utf-8")
    model_args = {"model": "kogpt", "base_url": f"{mini_url}/v1/completions", "tokenizer": str(mini_dir),
                  "tokenizer_backend": "huggingface", "tokenized_requests": tokenized, "add_bos_token": True,
                  "max_retries": 1}
    out = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=["nsmc_kogpt"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), num_fewshot=0,
                                  log_samples=True, random_seed=0, bootstrap_iters=0)
    samples = sorted(out["samples"]["nsmc_kogpt"], key=lambda s: s["doc_id"])
    ours = kogpt_eval["predictions"]
    assert len(samples) == len(ours) == 32
    for s, p in zip(samples, ours):
        assert str(s["doc"]["id"]) == p["id"]
        lls = [ll for ll, _greedy in s["filtered_resps"]]  # one (log-likelihood, is_greedy) per choice
        assert lls == pytest.approx(p["logprobs"], abs=1e-4), p["id"]
        assert max(range(2), key=lls.__getitem__) == p["pred"]
    acc = out["results"]["nsmc_kogpt"]["acc,none"]
    assert acc == pytest.approx(kogpt_eval["metrics"]["accuracy"], abs=1e-12)
    print(f"lm-eval acc {acc:.4f} (tokenized_requests={tokenized}) == kogpt eval {kogpt_eval['metrics']['accuracy']:.4f}")


def test_openai_client_token_id_prompts_and_echo_logprobs(mini_url):
    client = openai.OpenAI(base_url=f"{mini_url}/v1", api_key="unused", max_retries=0, timeout=60)
    tok = Tokenizer.from_dir(MINI)
    ids = tok.encode("오늘 날씨가 정말")
    by_text = client.completions.create(model="kogpt", prompt="오늘 날씨가 정말", max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="kogpt", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    two = client.completions.create(model="kogpt", prompt=[ids, ids[:2]], max_tokens=3, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    r = client.completions.create(model="kogpt", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == tok.decode(ids) and lp.tokens and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and all(v < 0 for v in lp.token_logprobs[1:])
    assert lp.top_logprobs[0] is None and all(len(t) == 1 for t in lp.top_logprobs[1:])
    with pytest.raises(openai.BadRequestError, match="token id 99999"):
        client.completions.create(model="kogpt", prompt=[ids[0], 99999], max_tokens=1)


@pytest.fixture(scope="module")
def tiny_served(tmp_path_factory, korean_tokenizer):
    folder = tmp_path_factory.mktemp("tiny")
    make_hf_model("gpt2", n_positions=128).save_pretrained(folder)
    korean_tokenizer.save(folder)
    proc, url = serve(folder, folder / "serve.log", "--max-tokens-limit", "8", "--max-batch-size", "4")
    yield folder, url
    stop(proc)


# Schema-valid requests that kogpt answers 400 on grounds JSON Schema cannot state (a prompt past the
# context, best_of other than n, pplm without bow, max_tokens over --max-tokens-limit): allowed as
# answers to positive data. Everything else is schemathesis's defaults.
SCHEMATHESIS_TOML = """\
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "401", "404", "429"]

[[operations]]
include-name = "GET /v1/models/{{name}}"
parameters = {{ name = "{model}" }}
"""


@pytest.mark.slow  # a fuzzer: ~30 s
def test_schemathesis_all_checks_find_nothing(tiny_served, tmp_path):
    folder, url = tiny_served
    (tmp_path / "schemathesis.toml").write_text(SCHEMATHESIS_TOML.format(model=folder))
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/openapi.json", "--checks", "all",
           "--max-examples", "60", "--workers", "2", "--seed", "21", "--request-timeout", "30"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr
    print(*[line for line in r.stdout.splitlines() if "generated" in line], summary)
    assert r.returncode == 0 and "No issues found" in summary, r.stdout[-6000:] + r.stderr[-2000:]
    assert "Fuzzing" in r.stdout and "Coverage" in r.stdout  # body fuzzing ran, not just examples

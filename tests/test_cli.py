"""The command line for real, in subprocesses: `kogpt generate` and the `python -m kogpt` prompt (pty)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pexpect
import pytest
import torch

PROMPT = "안녕하세요"


def kogpt(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kogpt", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("extra", [[], ["--repetition-penalty", "2.0"]], ids=["greedy", "rep2"])
def test_generate_json_equals_transformers_greedy(model_dir, hf_model, korean_tokenizer, extra):
    r = kogpt("generate", "--model", model_dir, "--prompt", PROMPT, "--greedy", "--max-new-tokens", 24, "--json", *extra)
    assert r.returncode == 0, r.stderr
    [line] = r.stdout.splitlines()
    out = json.loads(line)
    ids = korean_tokenizer.encode(PROMPT)
    kw = {"repetition_penalty": 2.0} if extra else {}
    expected = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=24, pad_token_id=3, eos_token_id=1, **kw)
    assert out["completion_token_ids"] == [t for t in expected[0, len(ids):].tolist() if t != 1]
    assert out["prompt"] == PROMPT and out["finish_reason"] in ("stop", "length")
    full = korean_tokenizer.decode(ids + out["completion_token_ids"], skip_special_tokens=True)
    assert PROMPT + out["completion"] == full


def test_generate_reads_prompt_file_and_stdin(model_dir, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("첫째\n\n둘째\n", encoding="utf-8")
    r = kogpt("generate", "--model", model_dir, "--prompt-file", f, "--greedy", "--max-new-tokens", 4, "--json")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["prompt"] for x in r.stdout.splitlines()] == ["첫째", "둘째"]
    r = kogpt("generate", "--model", model_dir, "--greedy", "--max-new-tokens", 4, "--json",
              "--num-return-sequences", 2, stdin="셋째\n")
    assert [json.loads(x)["prompt"] for x in r.stdout.splitlines()] == ["셋째", "셋째"]


def test_generate_stream_prints_the_same_text(model_dir):
    args = ["generate", "--model", model_dir, "--prompt", PROMPT, "--greedy", "--max-new-tokens", 12]
    plain, streamed = kogpt(*args), kogpt(*args, "--stream")
    assert plain.returncode == streamed.returncode == 0
    assert plain.stdout.strip() == streamed.stdout.strip() and plain.stdout.startswith(PROMPT)


@pytest.mark.parametrize("args,msg", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--model", "./no/such/model"], "model folder not found: ./no/such/model"),
])
def test_bad_options_give_one_line_and_exit_2(model_dir, args, msg):
    r = kogpt("generate", "--model", model_dir, "--prompt", PROMPT, *args)
    assert r.returncode == 2
    errors = [x for x in r.stderr.splitlines() if "error" in x]
    assert len(errors) == 1 and msg in errors[0] and "Traceback" not in r.stderr


def default_sigint() -> None:
    """Ctrl-C must reach the child even when the suite runs as a background job (whose shell set SIGINT
    to ignored, which children inherit)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_repl(model_dir):
    child = pexpect.spawn(sys.executable, ["-m", "kogpt", "--model", str(model_dir)], encoding="utf-8", timeout=60,
                          preexec_fn=default_sigint)
    child.expect_exact("prompt> ")
    return child


def test_repl_asks_validates_streams_and_says_goodbye(model_dir):
    child = spawn_repl(model_dir)
    child.sendline("")  # an empty prompt asks again
    child.expect_exact("prompt> ")
    child.sendline(PROMPT)
    child.expect_exact("temperature(0.8)> ")
    child.sendline("-1")
    child.expect_exact("temperature must be a number > 0")
    child.expect_exact("temperature(0.8)> ")
    child.sendline("뜨겁게")
    child.expect_exact("temperature must be a number > 0")
    child.sendline("")  # Enter keeps the default
    child.expect_exact("max_length(128)> ")
    child.sendline("0")
    child.expect_exact("max_length must be a whole number > 0")
    child.sendline("12")
    child.expect_exact(PROMPT)  # the answer starts with the prompt, continuation streamed after it
    child.expect_exact("prompt> ")
    child.sendeof()  # Ctrl-D
    child.expect_exact("bye!")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_repl_exits_cleanly_on_ctrl_c(model_dir):
    child = spawn_repl(model_dir)
    child.sendintr()
    child.expect_exact("bye!")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before


def test_a_command_imports_only_what_it_needs():
    """`kogpt generate` starts fast: describing every subcommand would import the training stack
    (kogpt.training.loop, torch._dynamo: ~2 s); `kogpt --help` lists every command all the same."""
    code = ("import sys\nfrom kogpt.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('kogpt.training.loop', 'kogpt.training.finetune', 'torch._dynamo') if m in sys.modules))")
    for args, heavy in [(["generate", "--help"], "[]"), (["--version"], "[]"),
                        (["finetune", "--help"], "['kogpt.training.finetune', 'kogpt.training.loop', 'torch._dynamo']")]:
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert r.stdout.strip().splitlines()[-1] == heavy, (args, r.stdout, r.stderr)
    r = kogpt("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("generate", "finetune", "train-tokenizer", "serve"))


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.skipif(_thp_mode() != "madvise", reason="needs transparent huge pages in madvise mode")
def test_the_cli_backs_big_tensors_with_huge_pages():
    """The kogpt process asks PyTorch for 2 MiB pages (THP_MEM_ALLOC_ENABLE); a user's =0 wins."""
    code = ("import sys, torch\nfrom kogpt.cli import main\nsys.argv = ['kogpt', '--version']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "x = torch.empty(64 << 20, dtype=torch.uint8); x.fill_(1)\n"
            "print([int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')][0])")
    def huge_kib(**env):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env)
        return int(r.stdout.split()[-1])
    assert huge_kib() >= 32 << 10  # most of the 64 MiB tensor
    assert huge_kib(THP_MEM_ALLOC_ENABLE="0") == 0

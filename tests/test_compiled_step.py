"""The optional torch.compile'd decode step (kogpt/compiled_step.py): same tokens as the eager step,
no recompiles when prompt lengths change, frozen weights on the CPU (and nowhere else), and the API/CLI switch.
GPU (CUDA graphs) when there is one."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._inductor.utils import run_and_get_code

from kogpt.api import KoGPT
from kogpt.hf.load import load
from kogpt.generation.compiled_step import CompiledStep
from kogpt.errors import UserError
from kogpt.generation.engine import Engine, Request, decode_step, generate, generate_ids

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[1, 5, 9, 3, 7], [2, 7], [4, 4, 4, 4, 4, 4, 4, 4]]


def run(model, prompts, n, step_fn):
    out = [[] for _ in prompts]
    for ev in generate(model, prompts, max_new_tokens=n, step_fn=step_fn):
        if ev.token >= 0:
            out[ev.key].append(ev.token)
    return out


def test_compiled_greedy_tokens_equal_the_eager_step(hf_dir):
    model = load(hf_dir)
    step = CompiledStep()
    assert run(model, PROMPTS, 12, step) == generate_ids(model, PROMPTS, max_new_tokens=12)
    # the logits, step by step, with rows of different lengths and a free row in the middle
    engines = [Engine(model, slots=3, step_fn=f) for f in (decode_step, step)]
    for e in engines:
        e.submit(Request(PROMPTS[0], 6, key=0))
        e.submit(Request(PROMPTS[2], 2, key=2))
        e.submit(Request(PROMPTS[1], 6, key=1))
    for _ in range(6):
        events = [e.step() for e in engines]
        assert events[0] == events[1]
        rows = [sorted((r, a.logits) for r, a in e.rows.items() if a.logits is not None) for e in engines]
        for (r0, l0), (r1, l1) in zip(*rows):
            assert r0 == r1 and torch.allclose(l0, l1, atol=1e-5)


def test_the_cpu_step_freezes_its_weights_and_leaves_other_compiles_alone(hf_dir):
    """Freezing (inductor packs the linears itself) and the C++ wrapper, set only around the step's own compile."""
    model = load(hf_dir)
    out, code = run_and_get_code(lambda: run(model, PROMPTS, 4, CompiledStep()))
    assert out == generate_ids(model, PROMPTS, max_new_tokens=4)
    assert "CppWrapperCodeCache" in code[0]  # the C++ wrapper
    assert "mkl_linear" in code[0] or "_linear_pointwise" in code[0]  # fp32 weights packed (MKL or oneDNN)
    assert not torch._inductor.config.freezing and not torch._inductor.config.cpp_wrapper
    layer, x = torch.nn.Linear(4, 4), torch.randn(2, 4)  # another compile in the process: weights stay live
    f = torch.compile(layer)
    with torch.inference_mode():
        y0 = f(x)
        layer.weight.add_(1.0)
        assert torch.allclose(f(x), y0 + x.sum(-1, keepdim=True))


def test_new_prompt_lengths_do_not_recompile(hf_dir):
    model = load(hf_dir)
    counter = CompileCounter()
    step = CompiledStep(backend=counter)
    assert run(model, PROMPTS, 5, step) == generate_ids(model, PROMPTS, max_new_tokens=5)
    compiled = counter.frame_count
    assert compiled >= 1
    other = [[9, 8, 7, 6, 5, 4, 3, 2, 1, 2, 3], [5], [6, 6, 6]]  # a different cache length, same rows
    assert run(model, other, 9, step) == generate_ids(model, other, max_new_tokens=9)
    assert counter.frame_count == compiled


@pytest.mark.parametrize("family", ["gpt2"])
def test_api_and_cli_compile_switch(model_dir):
    eager = KoGPT.from_pretrained(model_dir, device="cpu")
    compiled = KoGPT.from_pretrained(model_dir, device="cpu", compile=True)
    assert isinstance(compiled.step_fn, CompiledStep) and eager.step_fn is decode_step
    for prompt in ("안녕하세요", "오늘 날씨가 정말"):
        assert compiled.generate(prompt, greedy=True, max_new_tokens=10) == eager.generate(prompt, greedy=True,
                                                                                         max_new_tokens=10)
    with pytest.raises(UserError, match="not int8"):
        KoGPT.from_pretrained(model_dir, device="cpu", dtype="int8", compile=True)
    args = ["--model", str(model_dir), "--prompt", "안녕하세요", "--greedy", "--max-new-tokens", "8"]
    outs = [subprocess.run([sys.executable, "-m", "kogpt", "generate", *args, *extra], capture_output=True, text=True,
                           timeout=300) for extra in ([], ["--compile"])]
    assert outs[0].returncode == 0 and outs[1].returncode == 0, outs[1].stderr
    assert outs[0].stdout == outs[1].stdout and len(outs[0].stdout.strip()) > len("안녕하세요")
    assert "torch.compile'd decode step" in outs[1].stderr and "torch.compile" not in outs[0].stderr


def test_a_compiler_failure_is_one_clear_error(hf_dir):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    model = load(hf_dir)
    with pytest.raises(UserError, match=r"--compile: torch.compile failed .*run without --compile"):
        run(model, PROMPTS, 3, CompiledStep(backend=broken))
    cache_user = Engine(model, slots=2, step_fn=CompiledStep())
    with pytest.raises(ValueError, match=r"rows \[0, n\)"):
        cache_user.step_fn(model, torch.zeros(1, 1, dtype=torch.long), cache_user.cache, slice(1, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_step_equals_eager_on_gpu(hf_dir):
    model = load(hf_dir, device="cuda")
    step = CompiledStep(mode="reduce-overhead")
    torch._dynamo.utils.counters.clear()
    for _ in range(2):  # the second run replays the recorded graphs
        assert run(model, PROMPTS, 12, step) == generate_ids(model, PROMPTS, max_new_tokens=12)
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]  # graphs were recorded, not skipped

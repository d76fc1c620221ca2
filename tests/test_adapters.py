"""Adapters at inference (--adapter, applied without merging, any dtype) and many adapters over one base
(KoGPT.add_adapter, kogpt serve --lora): each row of a shared batch decodes exactly as with its adapter alone."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch

from kogpt.api import KoGPT
from kogpt.core.layout import Layout
from kogpt.core.lora import LoRABank, LoRAConfig, lora_banks, lora_layers
from kogpt.errors import UserError
from kogpt.generation.adapters import AdapterRouter, UseAdapter
from kogpt.generation.engine import Engine, Request, generate_ids
from kogpt.hf.load import load
from kogpt.hf.merge import merge_adapter
from kogpt.hf.peft import write_adapter
from kogpt.serve import create_app
from test_serve import running

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["오늘 날씨가", "대한민국의 수도는", "옛날 옛적에 한 마을에"]


def make_adapter(base: Path, out: Path, seed: int, std: float = 0.3, targets: str = "", r: int = 4) -> Path:
    """A PEFT adapter folder for `base` with random non-zero B (a fresh adapter would change nothing)."""
    model = load(base, Layout(torch.float32, lora=LoRAConfig.parse(targets, r=r, alpha=2.0 * r)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)
    write_adapter(model, out, base=str(base))
    return out


def greedy(gpt: KoGPT, prompts=PROMPTS, n: int = 16, **kw) -> list[list[int]]:
    return [c.token_ids for c in gpt.complete(prompts, max_new_tokens=n, greedy=True, repetition_penalty=1.0, **kw)]


@pytest.fixture(scope="module")
def mini() -> Path:
    from kogpt.hf.hub import resolve

    return resolve("kogpt-mini")


@pytest.fixture(scope="module")
def mini_adapter(mini, tmp_path_factory) -> Path:
    return make_adapter(mini, tmp_path_factory.mktemp("mini") / "adapter", seed=1, std=0.05, r=8)


# -- one adapter, applied without merging --------------------------------------------------------------
def test_adapter_equals_merged_model_both_families(model_dir, family, tmp_path):
    adapter = make_adapter(model_dir, tmp_path / "adapter", seed=0)
    merged = merge_adapter(model_dir, adapter, tmp_path / "merged")
    (merged / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    ours = KoGPT.from_pretrained(model_dir, device="cpu", dtype="fp32", adapter=adapter)
    assert all(type(m.base) is torch.nn.Linear for m in lora_banks(ours.model).values())  # not merged
    want = greedy(KoGPT.from_pretrained(merged, device="cpu", dtype="fp32"))
    assert greedy(ours) == want
    assert greedy(KoGPT.from_pretrained(model_dir, device="cpu", dtype="fp32")) != want  # the adapter matters


@pytest.fixture(scope="module")
def mini_merged(mini, mini_adapter, tmp_path_factory) -> Path:
    merged = merge_adapter(mini, mini_adapter, tmp_path_factory.mktemp("mini") / "merged")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (merged / name).write_bytes((mini / name).read_bytes())
    return merged


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
@torch.no_grad()
def test_adapter_beside_16bit_and_quantized_weights(mini, mini_adapter, mini_merged, dtype):
    """On the bundled model: the unmerged adapter, kept beside packed bf16, int8 or int4 weights, is as
    close to the exact (fp32, merged) model as the merged model in that dtype is. Greedy tokens cannot be asked
    to match there: merging rounds W + BA once, the unmerged layer rounds W and BA apart."""
    ours = KoGPT.from_pretrained(mini, device="cpu", dtype=dtype, adapter=mini_adapter)
    layer = ours.model.h[0].attn.qkv
    assert isinstance(layer, LoRABank) and layer.A.dtype == layer.Bt.dtype == torch.float32  # fp32: faster on CPU
    assert type(layer.base).__name__ == {"bf16": "PackedLinear", "int8": "Int8Linear", "int4": "Int4Linear"}[dtype]
    ids = torch.tensor([ours.encode_prompt("오늘 날씨가 좋아서 친구와 함께 공원에 갔다. 그곳에서")])
    exact = KoGPT.from_pretrained(mini_merged, device="cpu", dtype="fp32").model(ids).float()
    merged = KoGPT.from_pretrained(mini_merged, device="cpu", dtype=dtype).model(ids).float()
    base = KoGPT.from_pretrained(mini, device="cpu", dtype=dtype).model(ids).float()
    err, merged_err = (ours.model(ids).float() - exact).abs().mean(), (merged - exact).abs().mean()
    print(f"{dtype}: mean |logit error| unmerged {err:.4f}, merged {merged_err:.4f}")
    assert err <= 1.25 * merged_err
    assert (base - exact).abs().mean() > 2.5 * merged_err  # the adapter matters well above the rounding


def test_an_adapter_folder_names_its_base(model_dir, tmp_path):
    adapter = make_adapter(model_dir, tmp_path / "adapter", seed=0)
    via_folder = KoGPT.from_pretrained(adapter, device="cpu", dtype="fp32")  # adapter_config.json names the base
    assert greedy(via_folder) == greedy(KoGPT.from_pretrained(model_dir, device="cpu", dtype="fp32", adapter=adapter))
    with pytest.raises(UserError, match="is an adapter itself"):
        KoGPT.from_pretrained(adapter, device="cpu", adapter=adapter)


# -- many adapters over one base --------------------------------------------------------------------------
@pytest.fixture
def served(model_dir, tmp_path):
    """The base with adapters `a` (every linear) and `b` (attention only, another rank) added by name."""
    a = make_adapter(model_dir, tmp_path / "a", seed=1)
    b = make_adapter(model_dir, tmp_path / "b", seed=2, targets="attn", r=2)
    gpt = KoGPT.from_pretrained(model_dir, device="cpu", dtype="fp32")
    gpt.add_adapter("a", a)
    gpt.add_adapter("b", b)
    alone = {None: KoGPT.from_pretrained(model_dir, device="cpu", dtype="fp32"),
             "a": KoGPT.from_pretrained(model_dir, device="cpu", dtype="fp32", adapter=a),
             "b": KoGPT.from_pretrained(model_dir, device="cpu", dtype="fp32", adapter=b)}
    return gpt, alone


def test_rows_of_one_batch_use_their_own_adapters(served):
    gpt, alone = served
    want = {name: greedy(g) for name, g in alone.items()}
    assert len({json.dumps(w) for w in want.values()}) == 3  # the three models differ
    for name in want:
        assert greedy(gpt, adapter=name) == want[name]
    # one engine, rows of a, b and the base in one batch, joining at different steps
    prompts = [gpt.encode_prompt(p) for p in PROMPTS]
    engine = Engine(gpt.model, slots=4, max_len=64)
    order = [(0, "b"), (1, None), (2, "a"), (0, "a"), (2, None), (1, "b")]
    out = {i: [] for i in range(len(order))}
    for i, (p, name) in enumerate(order):
        hooks = [UseAdapter(gpt.router, gpt.adapter_index(name))] if name else []
        engine.submit(Request(prompts[p], 16, hooks=hooks, key=i))
        for ev in engine.step():  # one request joins per step
            out[ev.key].append(ev.token)
    while not engine.idle:
        for ev in engine.step():
            out[ev.key].append(ev.token)
    for i, (p, name) in enumerate(order):
        assert out[i] == want[name][p], (i, name)
    assert (gpt.router.rows[engine.cache] == -1).all()  # finished rows are freed


def test_speculation_and_steering_with_adapters(served):
    gpt, alone = served
    prompt = ["오늘 날씨가 좋다. 오늘 날씨가 좋다. 오늘 날씨가"]
    assert greedy(gpt, prompt, adapter="a", speculate=4) == greedy(alone["a"], prompt)  # an adapter may draft
    with pytest.raises(UserError, match="steering"):  # PPLM's own forwards would run through the base
        gpt.generate(PROMPTS[0], adapter="b", bow=["날씨"], max_new_tokens=4)
    assert gpt.generate(PROMPTS[0], bow=["날씨"], pplm={"stepsize": 0.05}, max_new_tokens=4, seed=0)  # the base
    always = alone["a"]  # an adapter loaded for every request is steered through its own layers
    steered = always.generate(PROMPTS[0], bow=["날씨"], pplm={"stepsize": 1.0}, max_new_tokens=6, seed=0, top_k=10)
    plain = always.generate(PROMPTS[0], bow=["날씨"], pplm={"stepsize": 0}, max_new_tokens=6, seed=0, top_k=10)
    assert plain == alone["a"].generate(PROMPTS[0], max_new_tokens=6, seed=0, top_k=10) and steered != plain


def test_add_adapter_refuses_what_it_cannot_serve(served, model_dir, tmp_path):
    gpt, alone = served
    for name in ("a", "", gpt.name):
        with pytest.raises(UserError, match="already taken"):
            gpt.add_adapter(name, tmp_path / "a")
    with pytest.raises(UserError, match="unknown adapter 'c'"):
        gpt.generate("안녕", adapter="c")
    with pytest.raises(UserError, match="loaded with an adapter"):
        alone["a"].add_adapter("b", tmp_path / "b")


def test_router_routes_only_its_engines_forwards(served):
    gpt, _ = served
    ids = torch.tensor([gpt.encode_prompt(PROMPTS[0])])
    plain = gpt.model(ids)
    assert torch.equal(plain, gpt.model(ids))  # outside an engine: the base
    assert isinstance(gpt.router, AdapterRouter)
    assert generate_ids(gpt.model, [ids[0].tolist()], max_new_tokens=2)  # no adapter assigned: base rows


# -- the server ---------------------------------------------------------------------------------------------
def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def test_server_lists_picks_and_batches_adapters(served):
    gpt, _ = served
    gpt.name = "tiny-base"
    with running(create_app(gpt, max_batch_size=4, chat_model="a")) as url:
        cards = httpx.get(f"{url}/v1/models").json()["data"]
        assert [(c["id"], c["parent"], c["chat_default"]) for c in cards] == [
            ("tiny-base", None, False), ("a", "tiny-base", True), ("b", "tiny-base", False)]
        assert httpx.get(f"{url}/v1/models/b").json()["parent"] == "tiny-base"
        r = post(url, "/v1/completions", {"model": "nope", "prompt": "안녕", "max_tokens": 4})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert httpx.get(f"{url}/v1/models/nope").status_code == 404

        def body(model, i):
            return {"model": model, "prompt": PROMPTS[i % 3], "max_tokens": 24, "temperature": 0,
                    "repetition_penalty": 1.0}

        jobs = [("a", 0), ("b", 1), ("a", 2), ("b", 0), ("tiny-base", 1)]  # four clients on two adapters + the base
        alone = {job: post(url, "/v1/completions", body(*job)).json()["choices"][0]["text"] for job in jobs}
        assert len({alone[("a", 0)], alone[("b", 0)]}) == 2
        got, barrier = {}, threading.Barrier(len(jobs))

        def client(job):
            barrier.wait()
            r = post(url, "/v1/completions", body(*job)).json()
            got[job] = (r["model"], r["choices"][0]["text"])

        threads = [threading.Thread(target=client, args=(job,)) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == {job: (job[0], alone[job]) for job in jobs}
        peak = httpx.get(f"{url}/metrics").text
        assert "kogpt_running_sequences" in peak

        chat = {"messages": [{"role": "user", "content": "안녕?"}], "max_tokens": 8, "temperature": 0}
        default = post(url, "/v1/chat/completions", chat).json()
        assert default["model"] == "a"  # no model named: the chat model
        named = post(url, "/v1/chat/completions", dict(chat, model="a")).json()
        assert named["choices"][0]["message"] == default["choices"][0]["message"]
        assert post(url, "/v1/chat/completions", dict(chat, model="tiny-base")).json()["model"] == "tiny-base"
        echo = post(url, "/v1/completions", {"model": "a", "prompt": PROMPTS[0], "max_tokens": 0, "echo": True,
                                             "logprobs": 0}).json()["choices"][0]["logprobs"]["token_logprobs"]
        base = post(url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 0, "echo": True,
                                             "logprobs": 0}).json()["choices"][0]["logprobs"]["token_logprobs"]
        assert echo[0] is None and echo[1:] != base[1:]  # the prompt is scored through the adapter
        r = post(url, "/v1/completions", {"model": "a", "prompt": "안녕", "max_tokens": 2, "bow": "sports"})
        assert r.status_code == 400 and "steering" in r.json()["error"]["message"]


def test_create_app_checks_the_chat_model(served):
    gpt, _ = served
    with pytest.raises(UserError, match="chat model 'c'"):
        create_app(gpt, chat_model="c")


# -- the command line -----------------------------------------------------------------------------------------
def kogpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kogpt", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("family", ["gpt2"])
def test_cli_adapter_and_lora_flags(model_dir, tmp_path):
    adapter = make_adapter(model_dir, tmp_path / "adapter", seed=0)
    r = kogpt("generate", "--model", str(model_dir), "--adapter", str(adapter), "--prompt", PROMPTS[0],
              "--max-new-tokens", "8", "--greedy", "--repetition-penalty", "1.0", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    want = KoGPT.from_pretrained(model_dir, device="cpu", dtype="fp32", adapter=adapter).generate(
        PROMPTS[0], max_new_tokens=8, greedy=True, repetition_penalty=1.0)
    assert " ".join(want.split()) in " ".join(r.stdout.split()) and f"adapter {adapter}" in r.stderr
    for args, message in ((["--lora", "x"], "expected NAME=DIR"),
                          (["--lora", f"x={adapter}", "--adapter", str(adapter)], "--adapter applies one adapter"),
                          (["--lora", f"x={adapter}", "--lora", f"x={adapter}"], "--lora names must differ")):
        r = kogpt("serve", "--model", str(model_dir), *args)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = kogpt("generate", "--model", str(model_dir), "--adapter", str(tmp_path / "missing"), "--prompt", "안녕")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "missing" in r.stderr


def test_serve_with_no_flags_serves_kogpt_mini_and_its_chat_adapter(tmp_path):
    """`kogpt serve` alone: the bundled base and kogpt-mini-chat; chat requests that name no model get the adapter."""
    from test_serve import _free_port, _up, wait_for

    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "kogpt", "serve", "--port", str(port), "--dtype", "fp32"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _up(url), timeout=60), (tmp_path / "serve.log").read_text()
        cards = httpx.get(f"{url}/v1/models").json()["data"]
        assert [(c["id"], c["parent"], c["chat_default"]) for c in cards] == [
            ("kogpt-mini", None, False), ("kogpt-mini-chat", "kogpt-mini", True)]
        chat = {"messages": [{"role": "user", "content": "주말에 뭐 하면 좋을까?"}], "max_tokens": 12,
                "temperature": 0}
        default = post(url, "/v1/chat/completions", chat).json()
        base = post(url, "/v1/chat/completions", dict(chat, model="kogpt-mini")).json()
        assert default["model"] == "kogpt-mini-chat" and base["model"] == "kogpt-mini"
        adapted = KoGPT.from_pretrained("kogpt-mini-chat", device="cpu", dtype="fp32")
        assert default["choices"][0]["message"] != base["choices"][0]["message"]
        assert post(url, "/v1/completions", {"prompt": "오늘", "max_tokens": 4}).json()["model"] == "kogpt-mini"
        assert adapted.adapters == {} and adapted.model.h[0].attn.qkv.always == (0,)
    finally:
        proc.terminate()
        proc.wait(30)
    assert "serving adapter kogpt-mini-chat" in (tmp_path / "serve.log").read_text()


@pytest.mark.parametrize("family", ["gpt2"])
def test_a_compiled_step_applies_the_adapter(model_dir, tmp_path):
    adapter = make_adapter(model_dir, tmp_path / "adapter", seed=0)
    compiled = KoGPT.from_pretrained(model_dir, device="cpu", compile=True, adapter=adapter)
    assert greedy(compiled, n=8) == greedy(KoGPT.from_pretrained(model_dir, device="cpu", dtype="fp32", adapter=adapter),
                                           n=8)
    plain = KoGPT.from_pretrained(model_dir, device="cpu", compile=True)
    with pytest.raises(UserError, match="eager decode step"):  # a compiled graph cannot route rows to adapters
        plain.add_adapter("a", adapter)

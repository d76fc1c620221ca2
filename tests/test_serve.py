"""kogpt serve through real HTTP: uvicorn on 127.0.0.1 (a thread, or the CLI in a subprocess), the
official openai client and raw httpx. OpenAI shapes and SSE framing, 400/401/413/429 error bodies,
cancellation on disconnect, greedy batched == unbatched, Hangul never split, a bounded load test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from conftest import KOREAN_LINES, make_hf_model
from kogpt.api import KoGPT
from kogpt.errors import UserError
from kogpt.generation.engine import decode_step
from kogpt.serve import ChatTemplate, create_app
from kogpt.generation.steering import Steerer


# -- helpers (test_web.py uses them too) -----------------------------------------------------------
@contextmanager
def running(app):
    """Serve `app` with uvicorn in a thread on a free loopback port; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def slow_step(delay: float):
    """An Engine step that takes at least `delay` seconds: keeps requests running long enough to act on."""
    def step(model, tok, cache, rows):
        time.sleep(delay)
        return decode_step(model, tok, cache, rows)
    return step


def scripted_model_dir(folder, tokenizer, cycle: list[int], prompt_len: int):
    """A GPT-2 folder whose greedy output after a `prompt_len`-token prompt repeats the ids `cycle`.

    Blocks are zeroed (residual pass-through), so the logits depend on wte and wpe only: position p
    points at the direction of the id to emit there (orthonormal, zero-mean, so LayerNorm keeps them).
    """
    hf = make_hf_model("gpt2", n_positions=256)
    targets = sorted(set(cycle))
    g = torch.Generator().manual_seed(0)
    A = torch.randn(32, len(targets), generator=g)
    Q, _ = torch.linalg.qr(A - A.mean(0))  # (32, k) orthonormal, zero-mean columns
    direction = {t: Q[:, k] for k, t in enumerate(targets)}
    tr = hf.transformer
    with torch.no_grad():
        for block in tr.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        tr.ln_f.weight.fill_(1.0)
        tr.ln_f.bias.zero_()
        tr.wte.weight.mul_(0.01)
        for t in targets:
            tr.wte.weight[t] = 4 * direction[t]
        for pos in range(tr.wpe.weight.size(0)):
            tr.wpe.weight[pos] = 20 * direction[cycle[(pos - prompt_len + 1) % len(cycle)]]
    hf.save_pretrained(folder)
    tokenizer.save(folder)
    return folder


def sse_events(response) -> list[str]:
    """The `data:` payloads of an SSE response, checking the framing on the way."""
    text = "".join(response.iter_text())
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


def health(url):
    return httpx.get(f"{url}/health").json()


def idle(url) -> bool:
    h = health(url)
    return h["status"] == "ok" and h["running"] == 0 and h["waiting"] == 0


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def metric(url, name: str, **labels: str) -> float:
    """One sample of GET /metrics, e.g. metric(url, "kogpt_batch_size_bucket", le="1.0")."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise KeyError(name)


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, korean_tokenizer):
    d = tmp_path_factory.mktemp("tiny")
    make_hf_model("gpt2", n_positions=256).save_pretrained(d)
    korean_tokenizer.save(d)
    return d


@pytest.fixture(scope="module")
def ref(tiny_dir):
    """A second copy of the model for in-process reference outputs."""
    return KoGPT.from_pretrained(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def url(tiny_dir):
    with running(create_app(KoGPT.from_pretrained(tiny_dir, device="cpu"), max_batch_size=8, max_queue=32,
                            max_body_bytes=64 * 1024, served_model_name="m")) as u:
        yield u


@pytest.fixture(scope="module")
def slow_url(tiny_dir):
    """2 slots + 1 queue place, 20 ms per step: requests stay running long enough to fill and cancel."""
    gpt = KoGPT.from_pretrained(tiny_dir, device="cpu")
    with running(create_app(gpt, max_batch_size=2, max_queue=1, step_fn=slow_step(0.02), served_model_name="m")) as u:
        yield u


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


# -- OpenAI API ---------------------------------------------------------------------------------
def test_completions_with_openai_client(client, ref):
    expected = ref.generate("안녕하세요", greedy=True, max_new_tokens=12)
    r = client.completions.create(model="m", prompt="안녕하세요", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(ref.encode_prompt("안녕하세요"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    chunks = list(client.completions.create(model="m", prompt="안녕하세요", max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-2].choices[0].finish_reason == "length"
    ext = dict(repetition_penalty=1.3, no_repeat_ngram_size=2)  # kogpt extensions, through extra_body
    r = client.completions.create(model="m", prompt="안녕하세요", max_tokens=12, temperature=0, extra_body=ext)
    assert r.choices[0].text == ref.generate("안녕하세요", greedy=True, max_new_tokens=12, **ext) != expected


def test_chat_with_openai_client(client, ref):
    messages = [{"role": "user", "content": "오늘 날씨 어때?"}]
    prompt, stops = ChatTemplate.default().render(messages)
    expected = ref.generate(prompt, greedy=True, max_new_tokens=10, stop=stops).lstrip()
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    stream = list(client.chat.completions.create(model="m", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected
    assert stream[-1].choices[0].finish_reason in ("stop", "length")
    card = client.models.list().data[0]
    assert card.chat_template["user_turn"] == "사용자: {content}\n" and "template" in card.chat_template["note"]


def test_sse_framing_and_done(url):
    body = {"prompt": ["안녕", "커피 한 잔"], "max_tokens": 6, "n": 2, "temperature": 0.9, "seed": 1, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    finished = [ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert sorted(finished) == [0, 1, 2, 3]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 24


def test_seed_n_echo_stop_and_logprobs(client, ref):
    kw = dict(model="m", prompt="대한민국의 수도는", max_tokens=8, temperature=1.0, n=2, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    full = ref.generate("안녕하세요", greedy=True, max_new_tokens=16)
    stop = full[len(full) // 3:][:2]
    r = client.completions.create(model="m", prompt="안녕하세요", max_tokens=16, temperature=0, stop=[stop], echo=True)
    assert r.choices[0].text == "안녕하세요" + full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="m", prompt="안녕하세요", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) == 3 and max(t.values()) >= v - 1e-5 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "안녕"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) <= 4 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


BAD = [
    (b'{"prompt": "\xec\x95\x88', None, "not valid JSON"),
    (b'[1, 2]', None, "body"),
    ({"prompt": 3}, "prompt", "string"),
    ({"prompt": "a", "max_tokens": "10"}, "max_tokens", "integer"),
    ({"prompt": "a", "stream": "yes"}, "stream", "boolean"),
    ({"prompt": "a", "temperature": 2.5}, "temperature", "less than or equal"),
    ({"prompt": "a", "top_p": 0}, "top_p", "greater than"),
    ({"prompt": "a", "top_k": -1}, "top_k", "greater than"),
    ({"prompt": "a", "n": 0}, "n", "greater than"),
    ({"prompt": "a", "temprature": 0.5}, "temprature", "Extra inputs"),
    ({"prompt": "a", "presence_penalty": 0.5}, "presence_penalty", "repetition_penalty"),
    ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, "stop", "at most 4"),
    ({"prompt": "a", "max_tokens": 257}, "max_tokens", "at most 256"),
    ({"prompt": "안녕하세요", "max_tokens": 255}, "max_tokens", "context"),
    ({"prompt": "오늘 날씨가 정말 좋네요 " * 80}, "prompt", "context holds 256"),
    ({"messages": []}, "messages", "at least 1"),
    ({"prompt": "a", "bow": "/etc/passwd"}, "bow", "bundled topic"),  # never a server-side file
    ({"prompt": "a", "bow": []}, "bow", "1 to 500 words"),
    ({"prompt": "a", "pplm": {"stepsize": 0.1}}, "pplm", "need bow"),
    ({"prompt": "a", "bow": "sports", "pplm": {"num_iterations": 50}}, "pplm", "less than"),
    ({"prompt": "a", "bow": "sports", "pplm": {"step": 1}}, "pplm", "Extra inputs"),
]


@pytest.mark.parametrize("body,param,words", BAD, ids=range(len(BAD)))
def test_bad_requests_are_400_with_openai_error_body(url, body, param, words):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    r = httpx.post(url + path, **({"content": body} if isinstance(body, bytes) else {"json": body}))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and words in err["message"]


def test_other_errors(url, client):
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "' + b"a" * 70_000 + b'"}')
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/nothing").json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="m", prompt="안녕 " * 300)


def test_pplm_extension_fields(client, ref):
    """bow + pplm steer through HTTP exactly as the Python API does; stepsize 0 is plain sampling."""
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.0, seed=5)
    extra = {"bow": ["서울", "영화"], "pplm": {"stepsize": 0.5}}
    r = client.completions.create(model="m", prompt="오늘은", max_tokens=10, temperature=1.0, seed=5, extra_body=extra)
    assert r.choices[0].text == ref.generate("오늘은", bow=["서울", "영화"], pplm={"stepsize": 0.5}, **kw)
    r0 = client.completions.create(model="m", prompt="오늘은", max_tokens=10, temperature=1.0, seed=5,
                                   extra_body={"bow": "sports", "pplm": {"stepsize": 0}})
    assert r0.choices[0].text == ref.generate("오늘은", top_k=10, **kw) != r.choices[0].text


# -- prompt forms, echo with logprobs, the schema --------------------------------------------------
def full_logprobs(gpt, ids):
    """Oracle: log p(ids[t] | ids[:t]) for t >= 1 from one plain forward, and each position's log-softmax."""
    logp = gpt.model(torch.tensor([ids]))[0, :-1].float().log_softmax(-1)  # (T-1, V)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist(), logp


def test_prompt_as_text_texts_ids_and_id_lists_generate_alike(url, ref):
    texts = ["안녕하세요", "오늘 날씨가"]
    ids = [ref.encode_prompt(t) for t in texts]
    def texts_of(prompt):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0}, timeout=30)
        assert r.status_code == 200, r.text
        return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]

    expected = [ref.generate(t, greedy=True, max_new_tokens=8) for t in texts]
    assert texts_of(texts) == texts_of(ids) == expected
    assert texts_of(texts[0]) == texts_of(ids[0]) == expected[:1]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0}).json()
    assert r["usage"]["prompt_tokens"] == sum(map(len, ids))


@pytest.mark.parametrize("prompt,words", [([5, 1000], "token id 1000"), ([[5], [7, -3]], "token id -3"),
                                          ([[]], "empty list"), ([], "empty list"), ([1, "a"], "prompt")])
def test_bad_token_id_prompts_are_400_naming_the_id(url, prompt, words):
    r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and words in r.json()["error"]["message"]


def test_echo_logprobs_score_the_prompt_like_a_plain_forward(url, ref):
    ids = ref.encode_prompt("대한민국의 수도는 서울입니다")
    want, logp = full_logprobs(ref, ids)
    for max_tokens in (0, 3):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": ids, "echo": True, "logprobs": 2, "n": 2,
                                                      "max_tokens": max_tokens, "temperature": 0}, timeout=30).json()
        assert len(r["choices"]) == 2 and r["choices"][0]["logprobs"] == r["choices"][1]["logprobs"]
        for c in r["choices"]:  # n > 1: each choice repeats the prompt part
            lp = c["logprobs"]
            assert c["text"].startswith(ref.tokenizer.decode(ids))
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) >= len(ids)
            assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
            for t, top in enumerate(lp["top_logprobs"][1:len(ids)]):  # top-2 of each prompt position
                best = logp[t].topk(2).values.tolist()
                assert sorted(top.values(), reverse=True) == pytest.approx(best, abs=1e-4)
            assert len(lp["tokens"]) == len(ids) + r["usage"]["completion_tokens"] // 2  # greedy: equal choices
        assert r["usage"]["completion_tokens"] == (0 if max_tokens == 0 else 2 * max_tokens)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "안녕", "echo": True, "max_tokens": 0}).json()
    assert r["choices"][0]["text"] == "안녕" and r["choices"][0]["logprobs"] is None
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 0


def test_echo_streams_the_prompt_with_the_first_piece_as_vllm_does(url, ref):
    ids = ref.encode_prompt("오늘 날씨가 좋네요")
    body = {"prompt": "오늘 날씨가 좋네요", "echo": True, "logprobs": 1, "max_tokens": 6, "temperature": 0}
    whole = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()["choices"][0]
    with httpx.stream("POST", f"{url}/v1/completions", json=dict(body, stream=True), timeout=30) as r:
        chunks = [json.loads(e)["choices"][0] for e in sse_events(r)[:-1]]
    assert chunks[0]["text"].startswith("오늘 날씨가 좋네요") and len(chunks[0]["logprobs"]["tokens"]) > len(ids)
    assert "".join(c["text"] for c in chunks) == whole["text"]
    tokens = [t for c in chunks for t in c["logprobs"]["tokens"]]
    token_lps = [t for c in chunks for t in c["logprobs"]["token_logprobs"]]
    assert tokens == whole["logprobs"]["tokens"]
    assert token_lps == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-5)
    with httpx.stream("POST", f"{url}/v1/completions", json=dict(body, stream=True, max_tokens=0), timeout=30) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and len(events) == 2  # max_tokens 0: the prompt alone, then done
    only = json.loads(events[0])["choices"][0]
    assert only["text"] == "오늘 날씨가 좋네요" and only["finish_reason"] == "length"
    assert len(only["logprobs"]["tokens"]) == len(ids)


def test_completion_logprobs_list_the_eos_token(tmp_path, korean_tokenizer):
    """A choice that stops at EOS lists it in logprobs (as OpenAI and vLLM do): lm-eval cuts the last entry."""
    eos = korean_tokenizer.eos_id
    folder = scripted_model_dir(tmp_path / "eos", korean_tokenizer, [eos], prompt_len=3)
    gpt = KoGPT.from_pretrained(folder, device="cpu")
    with running(create_app(gpt)) as u:
        r = httpx.post(f"{u}/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0,
                                                    "logprobs": 1, "echo": True}, timeout=30).json()
    c = r["choices"][0]
    assert c["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 1
    assert c["logprobs"]["tokens"][-1] == korean_tokenizer.eos_token and len(c["logprobs"]["tokens"]) == 4


def test_schema_documents_bodies_and_errors_and_405_has_allow(url):
    spec = httpx.get(f"{url}/openapi.json").json()
    post = spec["paths"]["/v1/completions"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/CompletionRequest")
    prompt = spec["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    assert {"type": "string"} in prompt["anyOf"] and {"items": {"type": "integer"}, "type": "array"} in prompt["anyOf"]
    for path, method, statuses in [("/v1/completions", "post", {"200", "400", "401", "413", "429"}),
                                   ("/v1/chat/completions", "post", {"200", "400", "401", "413", "429"}),
                                   ("/v1/models", "get", {"200", "401"}), ("/v1/models/{name}", "get", {"200", "401", "404"}),
                                   ("/health", "get", {"200", "503"})]:
        op = spec["paths"][path][method]
        assert statuses <= set(op["responses"]), (path, op["responses"].keys())
        for status in statuses - {"200", "503"}:
            assert op["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        assert "$ref" in op["responses"]["200"]["content"]["application/json"]["schema"]
    assert "text/event-stream" in post["responses"]["200"]["content"]
    r = httpx.get(f"{url}/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    form = {"content-type": "application/x-www-form-urlencoded"}  # what curl -d declares: still read as JSON
    r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "a", "max_tokens": 2}', headers=form)
    assert r.status_code == 200 and r.json()["object"] == "text_completion"


# -- batching, streaming text, cancellation, back-pressure ---------------------------------------
def test_greedy_batched_equals_unbatched(url):
    prompts = [line[:k] for line, k in zip(KOREAN_LINES, (3, 30, 8, 17, 1, 25, 40, 11))]  # mixed lengths
    def one(p):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": p, "max_tokens": 20, "temperature": 0}, timeout=30)
        return r.json()["choices"][0]["text"]

    alone = [one(p) for p in prompts]
    steps_before = metric(url, "kogpt_batch_size_count") - metric(url, "kogpt_batch_size_bucket", le="1.0")
    r = httpx.post(f"{url}/v1/completions", json={"prompt": prompts, "max_tokens": 20, "temperature": 0}, timeout=30)
    assert [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])] == alone
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, prompts)) == alone
    steps_after = metric(url, "kogpt_batch_size_count") - metric(url, "kogpt_batch_size_bucket", le="1.0")
    assert steps_after > steps_before  # some steps really decoded several rows


def test_hangul_is_never_split_in_stream_chunks(tmp_path, korean_tokenizer):
    # 3 byte-fallback pieces per syllable, then "." (StreamDecoder holds a run of byte pieces until it ends)
    text = "한국어."
    cycle = [korean_tokenizer.token_to_id(f"<0x{b:02X}>") for b in "한국어".encode()] + [korean_tokenizer.token_to_id(".")]
    prompt = "안녕"
    folder = scripted_model_dir(tmp_path / "scripted", korean_tokenizer, cycle,
                                len(korean_tokenizer.encode(prompt)))
    with running(create_app(KoGPT.from_pretrained(folder, device="cpu"))) as u:
        body = {"prompt": prompt, "max_tokens": 4 * len(cycle), "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{u}/v1/completions", json=body, timeout=30) as r:
            chunks = [json.loads(e)["choices"][0]["text"] for e in sse_events(r)[:-1]]
    pieces = [c for c in chunks if c]
    assert "".join(pieces) == text * 4
    assert len(pieces) >= 4 and not any("\ufffd" in c for c in pieces)  # streamed, each piece whole characters


def test_client_disconnect_frees_the_slot(slow_url):
    cancelled = metric(slow_url, "kogpt_sequences_cancelled_total")
    body = {"prompt": "안녕", "max_tokens": 200, "temperature": 0, "stream": True}  # 200 steps x 20 ms = 4 s
    with httpx.stream("POST", f"{slow_url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # keep a reference: a collected iterator closes the connection
        assert next(lines).startswith("data: ") and health(slow_url)["running"] == 1
    t = time.monotonic()
    assert wait_for(lambda: health(slow_url)["running"] == 0, timeout=2.0)
    assert time.monotonic() - t < 2.0 and metric(slow_url, "kogpt_sequences_cancelled_total") == cancelled + 1
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up is cancelled too
        httpx.post(f"{slow_url}/v1/completions", json=dict(body, stream=False), timeout=0.5)
    assert wait_for(lambda: health(slow_url)["running"] == 0, timeout=2.0)


def test_full_queue_is_429_fast_never_a_hang(slow_url):
    body = {"prompt": "안녕", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as h:
        streams = [h.stream("POST", f"{slow_url}/v1/completions", json=body) for _ in range(3)]
        for s in streams:  # 2 running + 1 queued = full
            s.__enter__()
        try:
            assert wait_for(lambda: health(slow_url)["waiting"] == 1)
            t = time.monotonic()
            r = httpx.post(f"{slow_url}/v1/completions", json=dict(body, stream=False), timeout=5)
            assert r.status_code == 429 and time.monotonic() - t < 2.0
            assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.headers["retry-after"] == "1"
            limited = openai.OpenAI(base_url=f"{slow_url}/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                limited.completions.create(model="m", prompt="안녕", max_tokens=5)
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    assert wait_for(lambda: idle(slow_url), timeout=3.0)


def test_bounded_load_has_no_5xx(url, client):
    statuses, lock = [], threading.Lock()
    deadline = time.monotonic() + 60

    def worker(i):
        for j in range(6):
            if time.monotonic() > deadline:
                return
            kind = (i + j) % 4
            try:
                if kind == 0:
                    client.completions.create(model="m", prompt=KOREAN_LINES[j], max_tokens=16, temperature=0.8)
                    code = 200
                elif kind == 1:
                    list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "안녕"}],
                                                        max_tokens=8, stream=True))
                    code = 200
                elif kind == 2:
                    code = httpx.post(f"{url}/v1/completions", timeout=30,
                                      json={"prompt": KOREAN_LINES[i % 8], "max_tokens": 24, "n": 2}).status_code
                else:
                    code = httpx.post(f"{url}/v1/completions", content=b"{oops", timeout=30).status_code
            except openai.APIStatusError as e:
                code = e.status_code
            with lock:
                statuses.append(code)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(worker, range(16)))
    assert len(statuses) == 96 and not [s for s in statuses if s >= 500]
    assert set(statuses) <= {200, 400, 429} and statuses.count(200) >= 60
    assert wait_for(lambda: idle(url))


def test_engine_failure_fails_only_the_open_requests(tiny_dir):
    broken = [True]

    def step(model, tok, cache, rows):
        if broken.pop() if broken else False:
            raise RuntimeError("boom")
        return decode_step(model, tok, cache, rows)

    with running(create_app(KoGPT.from_pretrained(tiny_dir, device="cpu"), step_fn=step, served_model_name="m")) as u:
        r = httpx.post(f"{u}/v1/completions", json={"prompt": "안녕", "max_tokens": 4})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        broken.append(True)
        with httpx.stream("POST", f"{u}/v1/completions", json={"prompt": "안녕", "max_tokens": 4, "stream": True}) as r:
            events = sse_events(r)
        assert "boom" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
        assert httpx.post(f"{u}/v1/completions", json={"prompt": "안녕", "max_tokens": 4}).status_code == 200
        assert idle(u)


def test_a_failing_steered_request_fails_alone(slow_url, monkeypatch):
    def perturb(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(Steerer, "perturb", perturb)
    body = {"prompt": "안녕", "max_tokens": 40, "temperature": 0, "stream": True}  # 40 steps x 20 ms
    with httpx.stream("POST", f"{slow_url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ") and health(slow_url)["running"] == 1
        bad = httpx.post(f"{slow_url}/v1/completions", timeout=30,
                         json={"prompt": "오늘은", "max_tokens": 5, "bow": "sports", "pplm": {"stepsize": 0.5}})
        assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
        events = [json.loads(e[6:]) for e in lines if e.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length"  # the other stream ran to its end
    assert wait_for(lambda: idle(slow_url))


def test_metrics_and_health(url, client):
    client.completions.create(model="m", prompt="안녕", max_tokens=3)
    r = httpx.get(f"{url}/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in ("kogpt_http_requests_total", "kogpt_prompt_tokens_total", "kogpt_generation_tokens_total",
                 "kogpt_time_to_first_token_seconds", "kogpt_request_latency_seconds", "kogpt_queue_depth",
                 "kogpt_batch_size", "kogpt_running_sequences"):
        assert f"# TYPE {name} " in r.text
    assert 'kogpt_http_requests_total{path="/v1/completions",status="200"}' in r.text
    assert metric(url, "kogpt_time_to_first_token_seconds_count") >= 1
    assert metric(url, "kogpt_generation_tokens_total") >= 3
    assert health(url)["status"] == "ok"


FAMILIES = {"kogpt_http_requests": "counter", "kogpt_prompt_tokens": "counter", "kogpt_generation_tokens": "counter",
            "kogpt_sequences_cancelled": "counter", "kogpt_time_to_first_token_seconds": "histogram",
            "kogpt_request_latency_seconds": "histogram", "kogpt_batch_size": "histogram",
            "kogpt_queue_depth": "gauge", "kogpt_running_sequences": "gauge", "kogpt_batch_slots": "gauge"}
LATENCY_BOUNDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf")]


def test_metrics_exposition_parses_whole_and_counts_one_request(tiny_dir, url):
    """prometheus_client's parser reads all of /metrics: exactly the families above with their types and
    buckets (no `_created` extras); a new app counts from zero beside the other servers of this process,
    and one completion moves its counters by exactly that completion; an OpenMetrics scraper gets OpenMetrics."""
    assert httpx.get(f"{url}/health").status_code == 200  # another app in this process counts a request

    def scrape(u) -> dict:
        r = httpx.get(f"{u}/metrics")
        assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        return {f.name: f for f in text_string_to_metric_families(r.text)}

    def value(families, name, **labels) -> float:
        return next(s.value for f in families.values() for s in f.samples if s.name == name and s.labels == labels)

    with running(create_app(KoGPT.from_pretrained(tiny_dir, device="cpu"), max_batch_size=4, served_model_name="m")) as u:
        before = scrape(u)
        assert {name: f.type for name, f in before.items()} == FAMILIES
        assert before["kogpt_http_requests"].samples == []  # this app's own registry: nothing counted yet
        for name in ("kogpt_prompt_tokens_total", "kogpt_generation_tokens_total", "kogpt_batch_size_count"):
            assert value(before, name) == 0
        for name in ("kogpt_time_to_first_token_seconds", "kogpt_request_latency_seconds"):
            bounds = [float(s.labels["le"]) for s in before[name].samples if s.name == name + "_bucket"]
            assert bounds == LATENCY_BOUNDS
        assert [float(s.labels["le"]) for s in before["kogpt_batch_size"].samples if s.labels] == \
            [1, 2, 4, 8, 16, 32, 64, 128, float("inf")]
        assert value(before, "kogpt_batch_slots") == 4

        done = httpx.post(f"{u}/v1/completions", json={"prompt": "안녕하세요", "max_tokens": 5, "temperature": 0})
        assert done.status_code == 200 and wait_for(lambda: idle(u))
        used = done.json()["usage"]
        after = scrape(u)
        assert {name: f.type for name, f in after.items()} == FAMILIES
        assert value(after, "kogpt_http_requests_total", path="/v1/completions", status="200") == 1
        assert value(after, "kogpt_http_requests_total", path="/metrics", status="200") == 1  # the first scrape
        assert value(after, "kogpt_prompt_tokens_total") == used["prompt_tokens"]
        assert value(after, "kogpt_generation_tokens_total") == used["completion_tokens"] == 5
        assert value(after, "kogpt_batch_size_sum") == value(after, "kogpt_batch_size_count") == 5  # batch of one
        for name in ("kogpt_time_to_first_token_seconds", "kogpt_request_latency_seconds"):
            assert value(after, name + "_count") == 1 and value(after, name + "_bucket", le="+Inf") == 1
        assert value(after, "kogpt_sequences_cancelled_total") == 0
        assert value(after, "kogpt_queue_depth") == value(after, "kogpt_running_sequences") == 0

        r = httpx.get(f"{u}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert r.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
        assert {f.name: f.type for f in openmetrics_families(r.text)} == FAMILIES


# -- the CLI: api key, limits, chat template file ------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_with_api_key_limit_and_template(tiny_dir, tmp_path):
    template = tmp_path / "chat.json"
    template.write_text(json.dumps({"system": "", "user_turn": "Q: {content}\n", "generation": "A:"}))
    port = _free_port()
    cmd = [sys.executable, "-m", "kogpt", "serve", "--model", str(tiny_dir), "--port", str(port), "--api-key", "s3cret",
           "--max-tokens-limit", "20", "--chat-template", str(template), "--max-batch-size", "2",
           "--served-model-name", "m"]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _up(url), timeout=60), (tmp_path / "serve.log").read_text()
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "a"}).status_code == 401
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/metrics").status_code == 401 and httpx.get(f"{url}/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["m"]  # a folder that is not kogpt-mini: no bundled adapter
        assert c.models.list().data[0].chat_template["generation"] == "A:"
        assert c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=3).usage.prompt_tokens == len(KoGPT.from_pretrained(
                                             tiny_dir).encode_prompt("Q: hi\nA:"))
        with pytest.raises(openai.BadRequestError, match="at most 20"):
            c.completions.create(model="m", prompt="a", max_tokens=21)
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


def _up(url) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_cli_serve_rejects_bad_flags_before_loading(capsys):
    from kogpt.cli import main

    assert main(["serve", "--model", "/nonexistent", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be >= 1" in capsys.readouterr().err


def test_chat_template_file_validation(tmp_path):
    bad = tmp_path / "t.json"
    for content, words in [("{", "JSON"), ('{"user": "x"}', "unknown keys"), ('{"user_turn": "no placeholder"}',
                                                                              "exactly once"),
                           ('{"stop": "x"}', "list of strings"), ("[1]", "JSON object")]:
        bad.write_text(content)
        with pytest.raises(UserError, match=words):
            ChatTemplate.from_file(bad)
    bad.write_text('{"user_turn": "U: {content}\\n"}')
    prompt, stops = ChatTemplate.from_file(bad).render([{"role": "user", "content": "{content} {system}"}])
    assert prompt.endswith("U: {content} {system}\n어시스턴트:") and "\n사용자:" in stops  # no re-substitution

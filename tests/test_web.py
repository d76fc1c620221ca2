"""The web playground in headless Chromium (Debian's /usr/bin/chromium driven by Playwright), against a
real server on 127.0.0.1. Completion tab: type a Korean prompt, Generate, watch Korean text stream in,
Stop, read an error; Steer panel: a PPLM-steered completion of kogpt-mini differs from the unsteered one
with the same seed. Chat tab: turns stream into the transcript and each request carries the whole
conversation; the model picker (GET /v1/models) switches between the base model and LoRA adapters.
KOGPT_UPDATE_SCREENSHOT=1 also writes docs/playground.png and docs/playground-chat.png (docs/serving.md)."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest
import torch
from playwright import sync_api

from conftest import ROOT, make_hf_model
from kogpt.api import KoGPT
from kogpt.core.layout import Layout
from kogpt.core.lora import LoRAConfig, lora_layers
from kogpt.generation.steering import TOPICS
from kogpt.hf.load import load
from kogpt.hf.peft import write_adapter
from kogpt.serve import create_app
from kogpt.text.chat import ChatTemplate
from test_serve import running, scripted_model_dir, slow_step, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]
SENTENCE = "안녕하세요. 한국어 GPT 모델입니다."
PROMPT = "오늘 날씨가"
GREETING = "안녕하세요"  # the Chat tab's first message


def write_test_adapter(base, out, std: float, seed: int):
    """A PEFT LoRA adapter (r 4, every projection) for the model folder `base`, B drawn with `std`
    (0: an adapter that changes nothing)."""
    m = load(base, Layout(torch.float32, lora=LoRAConfig(r=4)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(m).values():
            layer.lora_B.normal_(std=std, generator=g)
    write_adapter(m, out)
    return out


class Watch:
    """What a page does: the bodies it POSTs to /v1/completions and /v1/chat/completions (in order, as sent),
    every URL it asks for, and its JavaScript errors."""

    def __init__(self, page):
        self.sent, self.urls, self.errors = [], [], []
        page.on("request", self._request)
        page.on("pageerror", lambda e: self.errors.append(e))

    def _request(self, r):
        self.urls.append(r.url)
        if r.url.endswith("completions"):
            self.sent.append(r.post_data_json)

    def check(self, url: str) -> None:
        """No script error, and nothing asked of any server but ours (the page is self-contained)."""
        assert not self.errors and self.urls and all(u.startswith(url + "/") for u in self.urls), (self.errors, self.urls)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        why = "Chromium is not installed: apt-get install -y chromium fonts-nanum (.ci/run does)"
        if os.environ.get("CI"):  # CI installs it, so there a missing browser is a failure
            pytest.fail(why)
        pytest.skip(why)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def scripted_gpt(folder, tokenizer, prompt: str) -> KoGPT:
    """kogpt-test-tiny: writes SENTENCE over and over, from its start when the prompt is `prompt`."""
    scripted_model_dir(folder, tokenizer, tokenizer.encode(SENTENCE), len(tokenizer.encode(prompt)))
    gpt = KoGPT.from_pretrained(folder, device="cpu")
    gpt.name = "kogpt-test-tiny"
    return gpt


@pytest.fixture(scope="module")
def url(tmp_path_factory, korean_tokenizer):
    """A model scripted to write SENTENCE over and over, 40 ms per token, so Stop has time to act."""
    gpt = scripted_gpt(tmp_path_factory.mktemp("scripted"), korean_tokenizer, PROMPT)
    with running(create_app(gpt, step_fn=slow_step(0.04))) as u:
        yield u


@pytest.fixture(scope="module")
def chat_url(tmp_path_factory, korean_tokenizer):
    """The scripted model of `url`, its reply to GREETING starting with SENTENCE, plus a do-nothing
    adapter as the chat model."""
    first, _ = ChatTemplate.default().render([{"role": "user", "content": GREETING}])
    folder = tmp_path_factory.mktemp("scripted-chat")
    gpt = scripted_gpt(folder, korean_tokenizer, first)
    gpt.add_adapter("kogpt-test-tiny-chat", write_test_adapter(folder, folder / "chat", std=0.0, seed=0))
    with running(create_app(gpt, chat_model="kogpt-test-tiny-chat", step_fn=slow_step(0.04))) as u:
        yield u


@pytest.fixture(scope="module")
def lora_url(tmp_path_factory, korean_tokenizer):
    """A tiny random model with two LoRA adapters whose B is large enough to change greedy replies."""
    folder = tmp_path_factory.mktemp("lora-base")
    make_hf_model("gpt2", n_positions=256).save_pretrained(folder)
    korean_tokenizer.save(folder)
    gpt = KoGPT.from_pretrained(folder, device="cpu")
    gpt.name = "tiny-base"
    for seed, name in enumerate(("tiny-a", "tiny-b")):
        gpt.add_adapter(name, write_test_adapter(folder, folder / name, std=1.0, seed=seed))
    with running(create_app(gpt, chat_model="tiny-a")) as u:
        yield u


def test_generate_stream_and_stop_in_chromium(browser, url, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 640}, locale="ko-KR")
    page.goto(f"{url}/?lang=ko")
    sync_api.expect(page.locator("#model")).to_have_text("kogpt-test-tiny")
    page.locator("#max_tokens").fill("200")
    page.fill("#prompt", PROMPT)
    page.click("#generate")
    generated = page.locator("#generated")
    page.wait_for_function("document.getElementById('generated')?.textContent.includes('안녕하세요')", timeout=10_000)
    first = generated.text_content()
    more = max(len(first), 30)
    page.wait_for_function(f"document.getElementById('generated').textContent.length > {more}", timeout=10_000)
    assert page.locator("#stop").is_enabled() and page.locator("#generate").is_disabled()  # still streaming
    page.screenshot(path=str(tmp_path / "playground.png"))
    page.click("#stop")
    sync_api.expect(page.locator("#status")).to_have_text("중지됨")
    stopped = generated.text_content()
    assert ((" " + SENTENCE) * 30).startswith(stopped) and len(stopped) > more  # streamed, whole syllables
    page.wait_for_timeout(300)
    assert generated.text_content() == stopped and page.locator("#generate").is_enabled()
    assert wait_for(lambda: httpx.get(f"{url}/health").json()["running"] == 0, timeout=3)  # the slot was freed
    assert (tmp_path / "playground.png").stat().st_size > 10_000
    page.close()


def test_errors_are_shown_readably_and_english_ui(browser, url):
    page = browser.new_page()
    page.goto(f"{url}/?lang=ko")
    page.click("#lang")
    sync_api.expect(page.locator("#generate")).to_have_text("Generate")
    page.click("#generate")  # empty prompt: a hint, no request
    sync_api.expect(page.locator("#error")).to_have_text("Type a prompt first.")
    page.fill("#prompt", "가나다라 " * 300)  # longer than the 256-token context
    page.click("#generate")
    sync_api.expect(page.locator("#error")).to_contain_text("400: the prompt has")
    assert page.locator("#generate").is_enabled() and page.locator("#stop").is_disabled()
    watch = Watch(page)  # the Steer panel's own words, and the server's word on a bad stepsize
    sent = watch.sent
    page.fill("#prompt", PROMPT)
    page.click("#steer summary")
    page.select_option("#bow", "words")
    page.click("#generate")
    sync_api.expect(page.locator("#error")).to_have_text("Type the words to steer toward.")
    page.fill("#bow-words", "축구, 야구 ,올림픽")
    sync_api.expect(page.locator("#steer-state")).to_have_text("— 3 words")
    page.fill("#stepsize", "1.5")
    page.click("#generate")
    sync_api.expect(page.locator("#error")).to_have_text("Error: 400: pplm.stepsize: Input should be less than or equal to 1")
    assert sent[-1]["bow"] == ["축구", "야구", "올림픽"] and sent[-1]["pplm"] == {"stepsize": 1.5}
    page.click("#tab-chat")
    page.press("#chat-input", "Enter")  # an empty message: a hint, no request
    sync_api.expect(page.locator("#error")).to_have_text("Type a message first.")
    assert len(sent) == 1
    watch.check(url)
    page.close()



def test_chat_turns_stream_and_carry_the_conversation(browser, chat_url, korean_tokenizer, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 760}, locale="ko-KR")
    watch = Watch(page)
    sent = watch.sent
    page.goto(f"{chat_url}/?lang=ko")
    sync_api.expect(page.locator("#model")).to_have_value("kogpt-test-tiny")  # Completion: the base model
    page.click("#tab-chat")
    sync_api.expect(page.locator("#model")).to_have_value("kogpt-test-tiny-chat")  # Chat: the chat default
    replies = page.locator("#transcript .msg.assistant")
    # turn 1: exactly one sentence (max_tokens = its tokens), sent with Enter
    page.locator("#max_tokens").fill(str(len(korean_tokenizer.encode(SENTENCE))))
    page.fill("#chat-input", GREETING)
    page.press("#chat-input", "Enter")
    sync_api.expect(page.locator("#chat-status")).to_contain_text("완료")
    first = replies.nth(0).text_content()
    assert first == SENTENCE
    # turn 2: Shift+Enter is a new line; the reply streams (grows while Stop is enabled) until Stop
    page.locator("#max_tokens").fill("200")
    page.fill("#chat-input", "자기소개를")
    page.press("#chat-input", "Shift+Enter")
    page.keyboard.insert_text("더 해 주세요")
    assert page.input_value("#chat-input") == "자기소개를\n더 해 주세요" and len(sent) == 1
    page.press("#chat-input", "Enter")  # the prompt (~125 tokens) + 200 overflow the model's 256: a 400
    sync_api.expect(page.locator("#error")).to_contain_text("오류: 400: the prompt has")
    assert page.input_value("#chat-input") == "자기소개를\n더 해 주세요"  # the failed turn is taken back
    sync_api.expect(page.locator("#transcript .msg")).to_have_count(2)
    page.locator("#max_tokens").fill("90")
    page.press("#chat-input", "Enter")
    sync_api.expect(replies).to_have_count(2)
    second = replies.nth(1)
    sync_api.expect(second).to_contain_text("안녕하세요")
    grown = len(second.text_content())
    page.wait_for_function(f"document.querySelectorAll('#transcript .assistant')[1].textContent.length > {grown + 20}",
                           timeout=10_000)
    assert page.locator("#chat-stop").is_enabled() and page.locator("#send").is_disabled()  # still streaming
    page.screenshot(path=str(tmp_path / "playground-chat.png"))
    if os.environ.get("KOGPT_UPDATE_SCREENSHOT"):
        page.screenshot(path=str(ROOT / "docs" / "playground-chat.png"))
    page.click("#chat-stop")
    sync_api.expect(page.locator("#chat-status")).to_have_text("중지됨")
    stopped = second.text_content()
    assert stopped.strip() in (" " + SENTENCE) * 30
    assert wait_for(lambda: httpx.get(f"{chat_url}/health").json()["running"] == 0, timeout=3)  # the slot was freed
    # turn 3: the request carries every turn so far, the stopped reply as far as it got
    page.locator("#max_tokens").fill("3")
    page.fill("#chat-input", "고마워요")
    page.click("#send")
    sync_api.expect(replies).to_have_count(3)
    sync_api.expect(page.locator("#chat-status")).to_contain_text("완료")
    assert [b["model"] for b in sent] == ["kogpt-test-tiny-chat"] * 4 and all(b["stream"] for b in sent)
    assert sent[3]["messages"] == [{"role": "user", "content": GREETING}, {"role": "assistant", "content": first},
                                   {"role": "user", "content": "자기소개를\n더 해 주세요"},
                                   {"role": "assistant", "content": stopped},
                                   {"role": "user", "content": "고마워요"}]
    assert sent[1]["messages"] == sent[2]["messages"] == sent[3]["messages"][:3]
    assert page.locator("#transcript .msg.user").all_text_contents() == [GREETING, "자기소개를\n더 해 주세요", "고마워요"]
    page.click("#clear")
    sync_api.expect(page.locator("#transcript .msg")).to_have_count(0)
    watch.check(chat_url)
    page.close()


def test_model_picker_switches_adapters(browser, lora_url):
    page = browser.new_page()
    watch = Watch(page)
    sent = watch.sent
    page.goto(f"{lora_url}/?lang=en#chat")
    sync_api.expect(page.locator("#model")).to_have_value("tiny-a")  # the chat default
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["tiny-base", "tiny-a", "tiny-b"]
    page.locator("#temperature").fill("0")  # greedy
    page.locator("#max_tokens").fill("12")
    replies = {}
    for name in ("tiny-base", "tiny-b", "tiny-a"):
        page.select_option("#model", name)
        page.click("#clear")
        page.fill("#chat-input", "서울 여행지 추천해 줘")
        page.click("#send")
        sync_api.expect(page.locator("#chat-status")).to_contain_text("Done")
        replies[name] = page.locator("#transcript .msg.assistant").text_content()
        body = sent[-1]
        assert body["model"] == name and body["temperature"] == 0
        alone = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        served = httpx.post(f"{lora_url}/v1/chat/completions", json=alone, timeout=30).json()
        assert served["choices"][0]["message"]["content"] == replies[name]
    assert len(set(replies.values())) == 3, replies  # each adapter answers differently
    page.click("#tab-completion")
    sync_api.expect(page.locator("#model")).to_have_value("tiny-base")  # each tab keeps its own pick
    page.click("#tab-chat")
    sync_api.expect(page.locator("#model")).to_have_value("tiny-a")
    watch.check(lora_url)
    page.close()


def test_steered_completion_differs_from_unsteered(browser, tmp_path):
    gpt = KoGPT.from_pretrained("kogpt-mini", device="cpu")
    with running(create_app(gpt)) as url:
        page = browser.new_page(viewport={"width": 1200, "height": 700}, locale="ko-KR")
        watch = Watch(page)
        sent = watch.sent
        page.goto(f"{url}/?lang=ko")
        sync_api.expect(page.locator("#model")).to_have_value(gpt.name)
        topics = page.eval_on_selector_all("#bow option", "os => os.map(o => [o.value, o.textContent])")
        assert topics[1:-1] == [[en, f"{ko} ({en})"] for en, ko in TOPICS.items()]  # the page's list is the bundle's
        page.fill("#prompt", "오늘 경기에서")
        page.locator("#temperature").fill("1")
        page.locator("#top_k").fill("10")  # PPLM's top-k, for both runs: they differ only in steering
        page.locator("#max_tokens").fill("16")
        page.fill("#seed", "0")
        texts = []
        for topic in ("", "sports"):
            if topic:
                page.click("#steer summary")
                page.select_option("#bow", topic)
                page.fill("#stepsize", "0.1")
                sync_api.expect(page.locator("#steer-state")).to_have_text("— 스포츠 (sports)")
            page.click("#generate")
            sync_api.expect(page.locator("#status")).to_contain_text("완료", timeout=60_000)
            texts.append(page.locator("#generated").text_content())
        plain, steered = sent
        assert steered == dict(plain, bow="sports", pplm={"stepsize": 0.1}) and plain["seed"] == 0
        alone = {k: v for k, v in plain.items() if k not in ("stream", "stream_options")}
        assert httpx.post(f"{url}/v1/completions", json=alone, timeout=30).json()["choices"][0]["text"] == texts[0]
        assert texts[1] != texts[0] and texts[1].strip()  # the seed's sample, steered elsewhere
        page.screenshot(path=str(tmp_path / "playground.png"))
        if os.environ.get("KOGPT_UPDATE_SCREENSHOT"):
            page.screenshot(path=str(ROOT / "docs" / "playground.png"))
        watch.check(url)
        page.close()

"""The web playground in headless Chromium (Debian's /usr/bin/chromium driven by Playwright): type a
Korean prompt, Generate, watch Korean text stream in, Stop, read an error; saves a screenshot.
KOGPT_UPDATE_SCREENSHOT=1 also writes docs/playground.png (README and docs/serving.md)."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest
from playwright import sync_api

from conftest import ROOT
from kogpt.api import KoGPT
from kogpt.serve import create_app
from test_serve import running, scripted_model_dir, slow_step, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]
SENTENCE = "안녕하세요. 한국어 GPT 모델입니다."
PROMPT = "오늘 날씨가"


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


@pytest.fixture(scope="module")
def url(tmp_path_factory, korean_tokenizer):
    """A model scripted to write SENTENCE over and over, 40 ms per token, so Stop has time to act."""
    cycle = korean_tokenizer.encode(SENTENCE)
    folder = scripted_model_dir(tmp_path_factory.mktemp("scripted"), korean_tokenizer, cycle,
                                len(korean_tokenizer.encode(PROMPT)))
    gpt = KoGPT.from_pretrained(folder, device="cpu")
    gpt.name = "kogpt-test-tiny"
    with running(create_app(gpt, step_fn=slow_step(0.04))) as u:
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
    if os.environ.get("KOGPT_UPDATE_SCREENSHOT"):
        page.screenshot(path=str(ROOT / "docs" / "playground.png"))
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
    page.close()

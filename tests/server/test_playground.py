"""The playground page in a real browser: headless Chromium (Debian's `chromium` package, `make install` tries to
install it) driven by Playwright, against real `whale serve` instances: the default model for the chat and the
dashboard, the tiny DeepSeek-V3.2 checkpoint (a format that thinks) behind an API key for the thinking panel.
The planner view is checked against `whale plan --json`. Screenshots of each view go to build/screenshots/
(linked from the README)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
from server_harness import serving

SHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
CHROMIUM = os.environ.get("WHALE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extras: make install")
    if CHROMIUM is None:
        pytest.skip("no Chromium here: `apt-get install chromium` (make install tries it) or set WHALE_CHROMIUM")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


# every visible element with text of its own whose WCAG contrast against the background it sits on is under 4.5
# (disabled buttons are exempt, as WCAG has them)
CONTRAST = """(() => {
  const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
  const linear = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
  const lum = ([r, g, b]) => 0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b);
  const background = (node) => {
    for (; node; node = node.parentElement) {
      const c = rgb(getComputedStyle(node).backgroundColor);
      if (c.length < 4 || c[3] > 0) return c;
    }
    return [255, 255, 255];
  };
  const low = [];
  for (const node of document.querySelectorAll("body *")) {
    const own = [...node.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!own || !node.checkVisibility() || node.disabled) continue;
    const [a, b] = [lum(rgb(getComputedStyle(node).color)), lum(background(node))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) low.push(`${node.tagName}#${node.id}.${node.className}: ${ratio.toFixed(2)}`);
  }
  return low;
})()"""


def _open(browser, url: str, width: int = 1200):
    # the test's own predicates are script the page's CSP forbids (it allows none but its own file)
    page = browser.new_page(viewport={"width": width, "height": 900}, bypass_csp=True)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{url}/")
    return page, requested


def _content(page) -> str:
    return page.locator("#messages li.assistant .content").last.inner_text()


def test_chat_streams_stops_and_the_dashboard_reads_metrics(default_url, browser):
    page, requested = _open(browser, default_url)
    assert page.url == f"{default_url}/playground"
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    page.select_option("#model", "deepseek-chat")
    page.fill("#max-tokens", "2000")
    page.fill("#prompt", "Tell me a very long story about a whale and a lighthouse.")

    def no_early_end(route):  # the sampled story could end by itself before Stop is clicked: not this one
        route.continue_(post_data=json.dumps({**json.loads(route.request.post_data), "min_tokens": 1500}))

    page.route("**/v1/chat/completions", no_early_end)
    page.keyboard.press("Enter")  # focus is in the prompt: Enter sends
    page.wait_for_function("document.querySelector('#messages li.assistant .content')?.innerText.length > 0")
    early = len(_content(page))
    page.wait_for_function(f"document.querySelector('#messages li.assistant .content').innerText.length > {early + 20}")
    page.click("#stop")
    page.wait_for_selector("text=ended: stopped")
    page.unroute("**/v1/chat/completions")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    page.screenshot(path=SHOTS / "chat.png", full_page=True)
    # edit and resend: the conversation is cut at the edited message and answered again, to its end
    page.click("text=Edit and resend")
    assert page.input_value("#prompt").startswith("Tell me a very long story")
    page.fill("#max-tokens", "8")
    page.fill("#prompt", "Say hello.")
    page.click("#send")
    page.wait_for_selector("text=ended: length")
    assert page.locator("#messages li").count() == 2
    # conversations are kept in the browser
    page.reload()
    page.wait_for_selector("text=Say hello.")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    page.select_option("#model", "deepseek-chat")
    page.fill("#max-tokens", "8")
    page.click("#regenerate")  # the last reply again, in its place
    page.wait_for_function("document.querySelector('#send').disabled === false")
    assert page.locator("#messages li").count() == 2 and "ended: length" in page.inner_text("#messages")

    page.click("#tab-dashboard")
    assert not page.is_visible("#view-chat") and page.is_visible("#view-dashboard")
    page.wait_for_function("document.querySelector('#m-generated').innerText !== '-'")
    page.wait_for_timeout(2500)  # a second scrape: tokens/s needs two
    metrics = httpx.get(f"{default_url}/metrics").text
    generated = next(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith("whale_generation_tokens_total "))
    assert float(page.inner_text("#m-generated")) == generated
    assert page.inner_text("#m-running") == "0" and page.inner_text("#m-waiting") == "0"
    recent = httpx.get(f"{default_url}/metrics/recent").json()["data"]
    assert page.locator("#recent tr").count() == len(recent) >= 3
    newest = page.inner_text("#recent tr >> nth=0").split("\t")
    assert newest[1] == "/v1/chat/completions" and newest[3] == str(recent[0]["generated_tokens"]) == "8"
    assert newest[-1] == "length"
    assert page.inner_text("#recent tr >> nth=2").split("\t")[-1] == "client left"  # the stopped one
    page.screenshot(path=SHOTS / "dashboard.png", full_page=True)
    assert all(url.startswith(default_url) for url in requested), "the page asked another host"


def test_a_malformed_schema_shows_the_error_in_the_apis_words(default_url, browser):
    page, _ = _open(browser, default_url)
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    page.select_option("#format", "json_schema")
    page.fill("#schema", "{not json")
    page.fill("#prompt", "Give me a user record.")
    page.click("#send")
    assert "JSON schema is not valid JSON" in page.inner_text("#error")
    assert page.locator("#messages li").count() == 0 and page.input_value("#prompt")  # nothing sent, nothing lost
    page.fill("#schema", '{"type": "object", "properties": {"age": {"type": "integer", "minimum": "ten"}}}')
    page.click("#send")
    page.wait_for_function("document.querySelector('#error').innerText.startsWith('400: ')")
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Give me a user record."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
                "type": "object", "properties": {"age": {"type": "integer", "minimum": "ten"}}}}}}
    words = httpx.post(f"{default_url}/v1/chat/completions", json=body).json()["error"]["message"]
    assert page.inner_text("#error") == f"400: {words}"
    page.screenshot(path=SHOTS / "error.png", full_page=True)


def test_the_thinking_panel_with_its_budget_behind_an_api_key(tiny_path, default_llm, browser):
    from whale.models.loader import load_model

    with serving(load_model(str(tiny_path), dtype="float32"), api_keys=("sk-play",)) as (_, url):
        page, _ = _open(browser, url)
        page.wait_for_function("document.querySelector('#error').innerText.startsWith('401: ')")
        page.fill("#api-key", "sk-play")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
        page.select_option("#model", "deepseek-reasoner")
        page.fill("#budget", "8")
        page.fill("#max-tokens", "40")
        page.fill("#prompt", "What is 2 + 2?")
        page.click("#send")
        summary = page.locator("details.thinking summary")
        summary.wait_for()
        page.wait_for_function("document.querySelector('#send').disabled === false")
        words = summary.inner_text()
        assert "budget 8" in words
        tokens = int(words.split(" · ")[1].split()[0])
        assert 0 < tokens <= 8
        assert not page.is_visible(".thinking-text")  # collapsed until asked
        summary.click()
        assert page.is_visible(".thinking-text") and page.inner_text(".thinking-text")
        page.screenshot(path=SHOTS / "thinking.png", full_page=True)


def test_narrow_screens_and_labels(default_url, browser):
    page, _ = _open(browser, default_url, width=390)
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 390
    unlabelled = page.evaluate("[...document.querySelectorAll('input, select, textarea')]"
                               ".filter(c => c.labels.length === 0).map(c => c.id)")
    assert unlabelled == []
    assert page.evaluate(CONTRAST) == []
    page.keyboard.press("Tab")  # the first tab stop is the first view's tab, then on through the controls
    assert page.evaluate("document.activeElement.id") == "tab-chat"
    page.screenshot(path=SHOTS / "narrow.png", full_page=True)


def test_the_planner_view_is_whale_plan(default_url, browser):
    import json
    import subprocess
    import sys

    page, requested = _open(browser, default_url)
    page.click("#tab-planner")
    page.wait_for_function("document.querySelectorAll('#plan-model option').length > 5")
    page.select_option("#plan-model", "deepseek-v3")
    page.select_option("#plan-gpu", "H200")
    page.fill("#plan-context", "32k")
    page.click("#plan-go")
    page.wait_for_selector("#plan-result:not([hidden])")
    cli = json.loads(subprocess.run([sys.executable, "-m", "whale.cli", "plan", "deepseek-v3", "--gpu", "H200",
                                     "--context", "32k", "--json"], capture_output=True, text=True).stdout)
    summary = page.inner_text("#plan-summary")
    assert f"fits on {cli['gpus_needed']} GPUs ({cli['layout']['description']})" in summary
    assert page.locator("#plan-launch pre").all_inner_texts() == list(cli["launch"].values())
    weights = page.inner_text("#plan-memory tr >> nth=0").split("\t")
    assert weights == ["weights", f"{cli['per_gpu']['weights_bytes'] / 2**30:.1f}"]
    assert page.locator("#plan-bar span").count() == 5
    page.screenshot(path=SHOTS / "planner.png", full_page=True)
    page.fill("#plan-context", "lots")
    page.click("#plan-go")
    page.wait_for_function("document.querySelector('#error').innerText.startsWith('400: ')")
    assert "cannot read 'lots' as a token count" in page.inner_text("#error")
    assert all(url.startswith(default_url) for url in requested)


def test_tool_calls_are_cards(browser):
    """A V4 model's DSML tool call, written by the ScriptedEngine double (no V4 weights run here; the real server,
    tokenizer, encoder and parser do the rest), shown as a card with its parsed arguments."""
    import json

    from scripted_engine import deepseek_v4_served, scripted_server

    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
    call = ('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
            '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
            '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
    with scripted_server(deepseek_v4_served()) as (engine, url):
        engine.output = "I need the tool.</think>\n\n" + call
        page, _ = _open(browser, url)
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
        page.select_option("#model", "deepseek-v4-flash")
        page.fill("#tools", json.dumps([tool]))
        page.fill("#prompt", "Weather in Paris?")
        page.click("#send")
        card = page.locator(".tool-call")
        card.wait_for()
        page.wait_for_function("document.querySelector('#send').disabled === false")
        assert card.locator("strong").inner_text() == "Tool call: get_weather"
        assert json.loads(card.locator("pre").inner_text()) == {"city": "Paris", "days": 2}
        assert "ended: tool_calls" in page.inner_text("#messages li.assistant .meta")
        assert page.inner_text("details.thinking summary").startswith("Thinking")
        assert "get_weather" in engine.prompt_text()  # the pasted definition reached the model's prompt
        page.screenshot(path=SHOTS / "tools.png", full_page=True)

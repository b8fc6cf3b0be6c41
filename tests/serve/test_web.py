"""instructglm web: the chat handler streams growing partial answers and keeps the history; in headless
Chromium, two questions in a row show both turns, the second answered with the first as history; screenshot.

The browser test needs Debian's `chromium` and `chromium-driver`. Without them the test skips, unless
INSTRUCTGLM_REQUIRE_BROWSER=1 (set by CI), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from instructglm.infer.engine import BatchEngine
from instructglm.infer.generate import GenerationArguments
from instructglm.infer.engine import generate_batch
from instructglm.infer.load import load_model
from instructglm.serve.web import TITLE, build_app, launch
from tests.infer.helpers import free_port


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = "headless Chromium is not installed (apt-get install -y chromium chromium-driver)"
    if os.environ.get("INSTRUCTGLM_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + "; INSTRUCTGLM_REQUIRE_BROWSER=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


GREEDY = GenerationArguments(max_length=64, do_sample=False)
FIRST, SECOND = "What is two plus three?", "Reverse the words please"


@pytest.fixture
def loaded(llama_dir, llama_adapter):
    return load_model(str(llama_dir), adapter=str(llama_adapter), device="cpu")


@pytest.fixture
def engine(loaded):
    model, tokenizer, _ = loaded
    engine = BatchEngine(model, tokenizer, max_batch_size=4)
    engine.start()
    yield engine
    engine.stop()


def _greedy(loaded, query, history=()):
    model, tokenizer, prompter = loaded
    return generate_batch(model, tokenizer, [prompter.chat_ids(query, history)], GREEDY, prompter)[0].text


def _as_messages(*rounds):
    """(query, answer) rounds as the handler's history state holds them: message dicts."""
    return [m for q, a in rounds for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def _chat_handler(app):
    """The function Gradio runs when #submit is clicked (the same one Enter in #query runs)."""
    by_trigger = {app.blocks[block_id].elem_id: fn.fn for fn in app.fns.values() for block_id, _ in fn.targets}
    assert by_trigger["submit"] is by_trigger["query"]
    return by_trigger["submit"]


def _run_turn(handler, query, messages, history):
    """Drive one chat turn as Gradio does; the answer shown after each yield (copied: the handler
    reuses its message list), plus the final messages and history."""
    shown, histories = [], []
    for messages, new_history, textbox in handler(query, messages, history, GREEDY.max_length, 0.7, 0.0):
        assert textbox == ""
        assert messages[-2] == {"role": "user", "content": query}
        shown.append(messages[-1]["content"])
        histories.append(list(new_history))
    return shown, histories, messages


def test_handler_streams_growing_partial_answers_and_keeps_history(loaded, engine):
    handler = _chat_handler(build_app(engine, loaded[2], GenerationArguments(max_length=64, temperature=0.0)))
    expected = _greedy(loaded, FIRST)
    assert len(expected.split()) >= 6, f"the tiny model's greedy answer is too short to show streaming: {expected!r}"

    shown, histories, messages = _run_turn(handler, FIRST, [], [])
    # the question appears at once with an empty answer; the history only grows once the answer is complete
    assert shown[0] == ""
    assert all(h == [] for h in histories[:-1]) and histories[-1] == _as_messages((FIRST, expected))
    distinct = [text for i, text in enumerate(shown) if i == 0 or text != shown[i - 1]]
    assert len(distinct) >= 6, f"only {len(distinct)} distinct states were yielded: {distinct}"
    for before, after in zip(distinct, distinct[1:]):
        assert after.startswith(before) and len(after) > len(before), (before, after)
    assert distinct[-1] == expected

    # the next question is generated with the first round as history (the same template), and both rounds stay
    expected_second = _greedy(loaded, SECOND, [(FIRST, expected)])
    assert expected_second != _greedy(loaded, SECOND), "the history must change the answer for this check to mean anything"
    shown, histories, messages = _run_turn(handler, SECOND, messages, histories[-1])
    assert shown[-1] == expected_second
    assert histories[-1] == _as_messages((FIRST, expected), (SECOND, expected_second))
    assert [m["content"] for m in messages] == [FIRST, expected, SECOND, expected_second]


@pytest.fixture
def app_url(loaded, engine):
    model, tokenizer, prompter = loaded
    app = build_app(engine, prompter, GenerationArguments(max_length=64, temperature=0.0))
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}", (model, tokenizer, prompter)
    app.close()


def _texts(driver, role):
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, f"#chatbot [data-testid='{role}']")]


def _bot_texts(driver):
    return _texts(driver, "bot")


def _ask(driver, question):
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#query textarea").send_keys(question)
    driver.find_element(By.CSS_SELECTOR, "#submit").click()


def test_two_questions_stream_answers_into_the_page_with_history(browser, app_url, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, (model, tokenizer, prompter) = app_url
    browser.get(url)
    # Gradio re-renders the chat while it streams or clears: a message found can be gone before it is read.
    wait = WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,))
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#query textarea")))
    assert TITLE in browser.page_source
    for label in ("Maximum length", "Top P", "Temperature", "Clear History"):
        assert label in browser.page_source

    _ask(browser, FIRST)
    wait.until(lambda d: any(t.strip() for t in _bot_texts(d)))
    # Temperature 0 decodes greedily: the page shows the model's greedy answer once it has finished.
    first = _greedy((model, tokenizer, prompter), FIRST)
    wait.until(lambda d: _bot_texts(d) and _bot_texts(d)[-1].split() == first.split())
    # The box is emptied for the next question, which the model answers with the first round as history.
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#query textarea").get_attribute("value") == "")
    second = _greedy((model, tokenizer, prompter), SECOND, [(FIRST, first)])
    assert second.split() != _greedy((model, tokenizer, prompter), SECOND).split()
    _ask(browser, SECOND)
    wait.until(lambda d: len(_bot_texts(d)) == 2 and _bot_texts(d)[-1].split() == second.split())
    assert _texts(browser, "user") == [FIRST, SECOND]
    assert [t.split() for t in _bot_texts(browser)] == [first.split(), second.split()]
    shot = tmp_path / "web.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("INSTRUCTGLM_KEEP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["INSTRUCTGLM_KEEP_SCREENSHOT"])

    browser.find_element(By.CSS_SELECTOR, "#clear").click()
    wait.until(lambda d: not _bot_texts(d))
    time.sleep(0.2)
    assert not _bot_texts(browser)


def test_serve_web_mounts_the_chat_beside_the_api_on_one_engine_behind_the_key(browser, loaded, engine):
    """`serve --web`: the page at /web/ asks a browser for the key (HTTP Basic), the API keeps its bearer
    key, and both are answered by the same engine."""
    import httpx
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from instructglm.serve.api import create_app
    from tests.infer.helpers import reference_completion, serve_in_thread

    key = "web-key"
    app = create_app(engine, loaded[2], api_key=key, defaults=GenerationArguments(max_length=64, temperature=0.0), web=True)
    url, server, thread = serve_in_thread(app)
    try:
        r = httpx.get(url + "/web/")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(url + "/web/", auth=("anyone", "wrong")).status_code == 401
        assert httpx.get(url + "/v1/models").headers["www-authenticate"] == "Bearer"
        page = httpx.get(url + "/web/", auth=("anyone", key))
        assert page.status_code == 200 and "InstructGLM" in page.text
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                       json={"messages": [{"role": "user", "content": FIRST}], "max_tokens": 8, "temperature": 0})
        model, tokenizer, prompter = loaded
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == reference_completion(model, tokenizer, prompter.chat_ids(FIRST), 8, prompter).text
        expected = _greedy(loaded, FIRST)

        # Credentials in a URL log the browser in (as typing them into its login prompt would), but the page's
        # own fetch() refuses URLs that carry them: open it again at its plain address, logged in.
        browser.get(url.replace("http://", f"http://anyone:{key}@") + "/web/")
        browser.get(url + "/web/")
        wait = WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#query textarea")))
        _ask(browser, FIRST)
        wait.until(lambda d: _bot_texts(d) and _bot_texts(d)[-1].split() == expected.split())
    finally:
        server.should_exit = True
        thread.join(timeout=30)

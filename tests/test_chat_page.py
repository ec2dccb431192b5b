"""The chat page at / in real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
ask for the API key, list the models, stream a reply, show an error. The screenshot is kept as
test-artifacts/chat_page.png."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from serve_fixtures import Server, tiny_run  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Chromium and chromedriver: apt-get install -y chromium chromium-driver")

KEY = "sk-page-test-key"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def server():
    from steplab.serve.app import create_app

    app = create_app({"step-1-nano": str(tiny_run())}, api_keys={KEY})
    with Server(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="steplab-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,800", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))


def test_chat_page_streams_a_reply(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    # no key stored yet: /v1/models answers 401 and the page asks for one
    _wait(browser, lambda d: d.find_element(By.ID, "keybox").is_displayed())
    browser.find_element(By.ID, "apikey").send_keys(KEY)
    browser.find_element(By.ID, "savekey").click()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    assert browser.find_element(By.ID, "model").get_attribute("value") == "step-1-nano"
    assert browser.execute_script("return localStorage.getItem('steplab_api_key')") == KEY

    max_tokens = browser.find_element(By.ID, "max_tokens")
    max_tokens.clear()
    max_tokens.send_keys("60")
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")  # greedy: the same reply every run
    box = browser.find_element(By.ID, "input")
    box.send_keys("def main():")
    browser.find_element(By.ID, "send").click()
    reply = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))[-1]
    _wait(browser, lambda d: reply.get_attribute("data-state") == "done")
    text = reply.find_element(By.CLASS_NAME, "content").text
    assert text.strip(), "the reply stayed empty"
    assert int(reply.get_attribute("data-chunks")) > 1, "the reply arrived in one piece, not streamed"
    assert browser.find_element(By.ID, "status").text.startswith("done")
    assert [m.text for m in browser.find_elements(By.CSS_SELECTOR, ".msg.user .content")] == ["def main():"]
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "chat_page.png"))
    assert (ARTIFACTS / "chat_page.png").stat().st_size > 1000


def test_chat_page_shows_errors(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))  # the key is remembered
    max_tokens = browser.find_element(By.ID, "max_tokens")
    max_tokens.clear()
    max_tokens.send_keys("100000")  # more than the 256-token context
    browser.find_element(By.ID, "input").send_keys("hello")
    browser.find_element(By.ID, "send").click()
    error = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))[0]
    assert "maximum context length is 256" in error.text
    # a wrong key: the page says so and asks again
    browser.execute_script("localStorage.setItem('steplab_api_key', 'wrong')")
    browser.get(server.url + "/")
    _wait(browser, lambda d: d.find_element(By.ID, "keybox").is_displayed())
    assert "incorrect API key" in browser.find_element(By.ID, "keymsg").text
    browser.save_screenshot(str(ARTIFACTS / "chat_page_key_prompt.png"))


CHAT_RUN = os.environ.get("STEPLAB_CHAT_RUN")  # a run made by `steplab sft` (docs/benchmarks.md, issue 15)


@pytest.mark.slow
@pytest.mark.skipif(not CHAT_RUN, reason="set STEPLAB_CHAT_RUN to a run made by `steplab sft` to screenshot a real conversation")
def test_chat_page_converses_with_an_sft_model(browser):
    """Two turns with a chat model: every reply ends at <|end|> (finish 'stop', not the token cap); the
    screenshot test-artifacts/chat_page_sft.png shows the conversation."""
    from selenium.webdriver.common.by import By

    from steplab.serve.app import create_app

    with Server(create_app({"step-1-chat": CHAT_RUN}, api_keys={KEY}, dtype="fp32")) as srv:
        browser.get(srv.url + "/")
        browser.execute_script(f"localStorage.setItem('steplab_api_key', '{KEY}')")
        browser.get(srv.url + "/")
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        temperature = browser.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")
        for k, question in enumerate(["Hi! Who are you?", "What is 23 + 45?"], start=1):
            browser.find_element(By.ID, "input").send_keys(question)
            browser.find_element(By.ID, "send").click()
            _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == k)
            reply = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
            _wait(browser, lambda d: reply.get_attribute("data-state") == "done", timeout=120)
            assert reply.find_element(By.CLASS_NAME, "content").text.strip()
            assert "(stop)" in browser.find_element(By.ID, "status").text  # ended at <|end|>, not the cap
        assert [m.text for m in browser.find_elements(By.CSS_SELECTOR, ".msg.user .content")] == \
            ["Hi! Who are you?", "What is 23 + 45?"]
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "chat_page_sft.png"))


@pytest.fixture(scope="module")
def vision_server():
    """A small random-initialised Step-1V model: what matters here is that the page sends the image and the
    reply equals the API's greedy answer for the same image (issue 19)."""
    import torch

    from steplab.config import preset
    from steplab.data import images as I
    from steplab.data.tokenizer import Tokenizer
    from steplab.models.vision import Step1V
    from steplab.serve.app import create_app

    torch.manual_seed(0)
    tok = Tokenizer.load(I.build_tokenizer())
    cfg = preset("step1v-nano").model
    cfg.vocab_size = tok.vocab_size
    cfg.d_model, cfg.n_layer, cfg.d_ff, cfg.vision.n_layer = 64, 2, 128, 1
    app = create_app({"step-1v": (Step1V(cfg).eval(), tok)}, api_keys={KEY})
    with Server(app) as srv:
        yield srv


def test_chat_page_attaches_an_image(vision_server, browser, tmp_path):
    import httpx
    from PIL import Image
    from selenium.webdriver.common.by import By

    from steplab.data import images as I

    path = tmp_path / "scene.png"
    Image.fromarray(I.draw(("scene", 40))).save(path)
    browser.get(vision_server.url + "/")
    browser.execute_script(f"localStorage.setItem('steplab_api_key', '{KEY}')")
    browser.get(vision_server.url + "/")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    for field, value in (("max_tokens", "12"), ("temperature", "0")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "image").send_keys(str(path))
    _wait(browser, lambda d: d.find_element(By.ID, "attachment").is_displayed())
    browser.find_element(By.ID, "input").send_keys("what shape is the red object?")
    browser.find_element(By.ID, "send").click()
    reply = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))[-1]
    _wait(browser, lambda d: reply.get_attribute("data-state") == "done")
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.user img.thumb"), "the user message shows no image"
    assert not browser.find_element(By.ID, "attachment").is_displayed()  # sent: the attachment is cleared
    sent = browser.execute_script("return history[0].content")
    assert [p["type"] for p in sent] == ["image_url", "text"] and sent[0]["image_url"]["url"].startswith("data:image/png;base64,")
    # the page's reply is the API's greedy answer for the same image and question
    body = {"model": "step-1v", "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "user", "content": sent}]}
    r = httpx.post(vision_server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    shown = browser.execute_script("return arguments[0].textContent", reply.find_element(By.CLASS_NAME, "content"))
    assert shown == r.json()["choices"][0]["message"]["content"]
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "chat_page_image.png"))
    assert (ARTIFACTS / "chat_page_image.png").stat().st_size > 1000

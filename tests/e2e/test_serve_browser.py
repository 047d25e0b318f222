"""The web chat page of `omni serve` in a real browser: Debian's headless Chromium driven by selenium against a live
server on a tiny model. The page loads, an image is attached from disk, a question is asked, and the streamed answer
the page shows equals what the API returns for the same request; a second turn and Clear work too.

Needs /usr/bin/chromium and /usr/bin/chromedriver (`apt-get install -y chromium chromium-driver`; .ci/run installs
them when missing)."""

from __future__ import annotations

import shutil
from pathlib import Path

import openai
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.e2e.serve_helpers import data_url, live_server, png_bytes, save_serve_model

pytestmark = pytest.mark.browser
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MODEL = "tiny-omni"


def _binary(preferred: str, name: str) -> str:
    found = preferred if Path(preferred).is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver; .ci/run does it)")
    return found


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = _binary(CHROMIUM, "chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1000,760",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    # an explicit chromedriver: selenium never tries to download one
    driver = webdriver.Chrome(service=Service(executable_path=_binary(CHROMEDRIVER, "chromedriver")),
                              options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _answers(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".message.assistant")


def _ask(driver, text: str, timeout: float = 60):
    count = len(_answers(driver))
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, timeout).until(
        lambda d: len(_answers(d)) > count and _answers(d)[count].get_attribute("data-state") == "done"
        or d.find_element(By.ID, "error").is_displayed())
    error = driver.find_element(By.ID, "error")
    assert not error.is_displayed(), error.text
    answer = _answers(driver)[count]
    return answer.find_element(By.CSS_SELECTOR, ".text").text, answer


def test_chat_page_streams_the_api_answer_for_an_attached_image(browser, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-page")
    image = root / "shape.png"
    image.write_bytes(png_bytes(7, (32, 32)))
    with live_server([str(save_serve_model(root / MODEL)), "--api-key", "page-key"]) as (url, engine, _):
        browser.get(url + "/")
        browser.find_element(By.ID, "api-key").send_keys("page-key")
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("0")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("24")
        browser.find_element(By.ID, "attach-image").send_keys(str(image))
        WebDriverWait(browser, 20).until(lambda d: "shape.png" in d.find_element(By.ID, "attachments").text)
        shown, bubble = _ask(browser, "What shape is this?")
        assert browser.find_element(By.ID, "model-name").text == f"model: {MODEL}"
        assert int(bubble.get_attribute("data-chunks")) > 1  # the page received it in pieces

        client = openai.OpenAI(base_url=url + "/v1", api_key="page-key", max_retries=0, timeout=60)
        first_turn = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(image.read_bytes(), "image/png")}},
            {"type": "text", "text": "What shape is this?"}]}]
        expected = client.chat.completions.create(model=MODEL, messages=first_turn, max_tokens=24, temperature=0)
        # the DOM shows text with whitespace normalised by the browser's layout; the page's own record is exact
        raw = browser.execute_script("return arguments[0].querySelector('.text').textContent", bubble)
        assert raw == expected.choices[0].message.content
        assert bubble.get_attribute("data-finish") == expected.choices[0].finish_reason
        assert shown.split() == raw.split()

        # a second turn sends the whole history (image included), as the API would get it
        second, _ = _ask(browser, "And its colour?")
        history = [*first_turn, {"role": "assistant", "content": expected.choices[0].message.content},
                   {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]}]
        expected_second = client.chat.completions.create(model=MODEL, messages=history, max_tokens=24, temperature=0)
        raw_second = browser.execute_script("return arguments[0].querySelector('.text').textContent",
                                            _answers(browser)[1])
        assert raw_second == expected_second.choices[0].message.content
        screenshot = root / "serve_page.png"
        browser.save_screenshot(str(screenshot))
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        browser.find_element(By.ID, "clear").click()
        assert _answers(browser) == [] and browser.find_element(By.ID, "attachments").text == ""
        assert engine.stats()["running"] == 0

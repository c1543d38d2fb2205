"""The /playground page in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium; nothing is downloaded), against a real server with the embedded model. Assertions are on
what a person sees: two answers, one shaded token per generated token, drawn charts, errors as text."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import httpx
import pytest

from axiscap.steering.gate import GATE_KEY

from .conftest import server

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    # `make tools` installs them as root; CI must not skip the browser silently.
    if os.environ.get("CI"):
        raise RuntimeError("chromium and chromedriver are missing: run `make tools` as root")
    pytest.skip("chromium and chromedriver are not installed (make tools)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

@pytest.fixture(scope="module")
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1500"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def fill(browser, element_id: str, value: str) -> None:
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def send_turn(browser, message: str, turns_before: int, timeout: float = 180) -> list:
    fill(browser, "message", message)
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, timeout).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, ".turn")) == turns_before + 1 and all(
            cell.get_attribute("data-state") != "streaming"
            for cell in b.find_elements(By.CSS_SELECTOR, ".turn:last-child .side"))
        and b.find_element(By.ID, "send").is_enabled())
    return browser.find_elements(By.CSS_SELECTOR, ".turn:last-child .side")


def painted_pixels(browser, canvas) -> int:
    return browser.execute_script(
        "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;", canvas)


def open_page(browser, live) -> None:
    browser.get(live.base_url + "/playground")
    WebDriverWait(browser, 30).until(lambda b: "monitor layer" in b.find_element(By.ID, "server-info").text)


def test_three_streams_side_by_side_across_two_turns(smollm2, smollm2_axis, browser, tmp_path):
    # An axis whose gate every message falls below: the gated side switches capping on at its first token.
    axis = dataclasses.replace(smollm2_axis, extra={**smollm2_axis.extra, GATE_KEY: "1e9"})
    with server(smollm2, axis, max_batch_size=4) as live:
        open_page(browser, live)
        info = browser.find_element(By.ID, "server-info").text
        assert "τ =" in info and browser.find_element(By.ID, "notice").get_attribute("hidden")
        fill(browser, "max-tokens", "12")
        fill(browser, "seed", "7")

        cells = send_turn(browser, "Will I be happy?", 0)
        assert [c.get_attribute("data-side") for c in cells] == ["capped", "gated", "uncapped"]
        for cell in cells:
            assert cell.get_attribute("data-state") == "done"
            tokens = cell.find_elements(By.CSS_SELECTOR, ".tok")
            assert len(tokens) == int(cell.get_attribute("data-tokens")) > 0  # one span per generated token
            assert cell.find_element(By.CSS_SELECTOR, ".answer").text.strip()
            assert all("rgba" in t.get_attribute("style") for t in tokens)  # each one shaded
            assert painted_pixels(browser, cell.find_element(By.TAG_NAME, "canvas")) > 100
            assert "mean projection" in cell.find_element(By.CSS_SELECTOR, ".stats").text
        turn_chart = browser.find_element(By.ID, "turn-chart")
        assert turn_chart.get_attribute("data-points") == "1" and painted_pixels(browser, turn_chart) > 100
        # Where the gated answer's capping began: marked on its first token, and said under it.
        gated = cells[1]
        assert gated.get_attribute("data-capping-from") == "0"
        assert "cap-start" in gated.find_elements(By.CSS_SELECTOR, ".tok")[0].get_attribute("class")
        assert "capped from the first token" in gated.find_element(By.CSS_SELECTOR, ".stats").text
        assert cells[0].get_attribute("data-capping-from") is None
        # The conversation's trajectory: the prompt's system and user messages, then the answers.
        trajectory = browser.find_element(By.ID, "trajectory-chart")
        assert trajectory.get_attribute("data-messages") == "2" and painted_pixels(browser, trajectory) > 100

        # Continue from the uncapped answer: the next request carries that answer as the assistant turn.
        uncapped = cells[2]
        answer = "".join(t.text if "eos" not in t.get_attribute("class") else ""
                         for t in uncapped.find_elements(By.CSS_SELECTOR, ".tok"))
        uncapped.find_element(By.CSS_SELECTOR, ".continue").click()
        assert "chosen" in uncapped.get_attribute("class")
        cells = send_turn(browser, "Tell me more.", 1)
        assert all(c.get_attribute("data-state") == "done" for c in cells)
        assert browser.find_element(By.ID, "turn-chart").get_attribute("data-points") == "2"
        # Now system, user, the chosen assistant answer and the new user message.
        trajectory = browser.find_element(By.ID, "trajectory-chart")
        assert trajectory.get_attribute("data-messages") == "4"
        assert "1 assistant turn · EWMA" in browser.find_element(By.ID, "trajectory-stats").text
        sent = json.loads(browser.find_element(By.ID, "last-request").get_attribute("textContent").split("\n", 1)[1])
        assert sent["messages"][-2] == {"role": "assistant", "content": answer}
        assert sent["messages"][-1]["content"] == "Tell me more." and sent["seed"] == 7
        browser.save_screenshot(str(tmp_path / "playground.png"))  # what docs/playground.png shows

        # An API error is a message on the page, and the page keeps working.
        fill(browser, "max-tokens", "100000")
        cells = send_turn(browser, "Once more.", 2)
        for cell in cells:
            assert cell.get_attribute("data-state") == "error"
            assert "400" in cell.find_element(By.CSS_SELECTOR, ".error").text
            assert "max_tokens" in cell.find_element(By.CSS_SELECTOR, ".error").text
        assert browser.find_element(By.ID, "message").get_attribute("value") == "Once more."


def test_an_enforced_policy_shows_one_answer_and_says_why(smollm2, smollm2_axis, browser):
    with server(smollm2, smollm2_axis, capping_policy="always", allow_projections=False) as live:
        open_page(browser, live)
        notice = browser.find_element(By.ID, "notice")
        assert not notice.get_attribute("hidden")
        assert "enforces capping (always)" in notice.text and "does not return axis projections" in notice.text
        fill(browser, "max-tokens", "6")
        [cell] = send_turn(browser, "Hello there.", 0)
        assert cell.get_attribute("data-side") == "enforced" and cell.get_attribute("data-state") == "done"
        assert len(cell.find_elements(By.CSS_SELECTOR, ".tok")) == int(cell.get_attribute("data-tokens"))


def test_the_playground_can_be_switched_off(smollm2, smollm2_axis):
    with server(smollm2, smollm2_axis, playground=False) as live:
        assert httpx.get(live.base_url + "/playground").status_code == 404

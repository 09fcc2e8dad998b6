"""The built-in chat page in a real browser (Debian's chromium, driven by selenium): type a message,
wait for the streamed reply, read the cache meter."""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import pytest
from conftest import DEFAULT_MODEL, needs_model
from serving import Server

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install 'amslocal[server]'")
webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
# CI installs the browser (tests/browser-deps.sh) and sets this, so that a missing browser fails there
if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("AMSLOCAL_REQUIRE_BROWSER"):
        raise RuntimeError("chromium and chromedriver are required (run: bash tests/browser-deps.sh)")
    pytest.skip("chromium/chromedriver not installed (bash tests/browser-deps.sh)", allow_module_level=True)


@pytest.fixture()
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="amslocal-chromium-")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@needs_model
def test_chat_page_streams_a_reply_and_shows_the_cache_meter(browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with Server(DEFAULT_MODEL, "--budget", "64", "--interval", "32", "-t", "1", "-n", "48") as server:
        browser.get(server.base + "/")
        wait = WebDriverWait(browser, 120)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "SmolLM2-135M-Instruct.Q4_1")
        assert browser.find_element(By.ID, "meter").text == "0 / 64 (+32)"
        assert browser.find_element(By.ID, "scorer").get_attribute("value") == "rkv"

        def ask(text: str):
            box = browser.find_element(By.ID, "input")
            box.send_keys(text)
            box.send_keys(Keys.ENTER)
            n = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']")) >= n)
            return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]

        first = ask("Tell me a long story about a lighthouse keeper.")
        assert first.find_element(By.CLASS_NAME, "text").text.strip()
        used, budget = re.fullmatch(r"(\d+) / (\d+) \(\+32\)", browser.find_element(By.ID, "meter").text).groups()
        assert budget == "64" and 0 < int(used) <= 64 + 32
        second = ask("And what happened next?")
        meta = second.find_element(By.CLASS_NAME, "meta").text
        # the page resent the whole conversation; the server read only the new message
        fed, total = map(int, re.search(r"read (\d+) of (\d+) prompt tokens", meta).groups())
        assert fed < total
        compressions = sum(
            int(m.get_attribute("data-compressions")) for m in browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        )
        assert compressions > 0 and "compression" in meta
        sessions = server.get("/amslocal/sessions")[2]["data"]
        assert len(sessions) == 1 and sessions[0]["messages"] == 4

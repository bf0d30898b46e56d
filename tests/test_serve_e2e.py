"""The web page in a real browser: Chromium, driven by Playwright, against a live server."""

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from difflab.serve import create_app

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright's own browser download does not work offline
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
TIMEOUT_MS = 20_000


@pytest.fixture
def app_factory(fake_backend):
    """Builds the app under test; override this fixture to point the page test at a real model run."""
    return lambda: create_app(fake_backend(step_seconds=0.05), max_n=8)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("DIFFLAB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason}, and DIFFLAB_REQUIRE_BROWSER=1 requires the browser test")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_factory, live_server):
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(live_server(app_factory()))
    expect(page.locator("#solver option")).not_to_have_count(0)  # /v1/info has filled the form
    return page


def test_the_page_generates_images_that_download_with_their_settings(page, tmp_path):
    page.fill("#prompt", "A red fox!")
    page.fill("#count", "3")
    page.fill("#seed", "11")
    page.click("#generate")
    images = page.locator("img.result")
    expect(images).to_have_count(3)
    page.wait_for_function("[...document.querySelectorAll('img.result')].every(img => img.naturalWidth > 0)",
                           timeout=TIMEOUT_MS)
    assert [images.nth(i).get_attribute("alt") for i in range(3)] == ["A red fox!"] * 3
    links = page.locator("#grid a[download]")
    assert [links.nth(i).get_attribute("download") for i in range(3)] == ["a-red-fox-11.png", "a-red-fox-12.png",
                                                                         "a-red-fox-13.png"]
    expect(page.locator("#grid figcaption").first).to_contain_text("seed 11")
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#error")).to_have_text("")

    with page.expect_download(timeout=TIMEOUT_MS) as download:
        links.nth(1).click()
    download.value.save_as(tmp_path / "image.png")
    settings = json.loads(Image.open(tmp_path / "image.png").text["difflab"])
    assert (settings["prompt"], settings["seed"]) == ("A red fox!", 12)

    page.fill("#prompt", "a blue bird")
    page.press("#prompt", "Enter")  # Enter submits; Shift+Enter would start a new line
    expect(images.first).to_have_attribute("alt", "a blue bird")


def test_the_page_shows_the_servers_error(page):
    page.fill("#prompt", "a red fox")
    too_many = int(page.get_attribute("#count", "max")) + 1
    page.fill("#count", str(too_many))
    page.click("#generate")
    error = f"Error 422: n: Input should be less than or equal to {too_many - 1}"  # the server's words
    expect(page.locator("#error")).to_contain_text(error)
    expect(page.locator("#generate")).to_be_enabled()

    page.fill("#count", "1")
    page.fill("#steps", "")
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("steps: Input should be a valid integer")
    expect(page.locator("img.result")).to_have_count(0)


def test_difflab_serve_on_a_trained_text_run(browser, text_run):
    """The real thing: `difflab serve RUN` as its own process, the page asking the trained model for two images."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "difflab", "serve", str(text_run), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"difflab serve exited: {server.stdout.read()}"
            assert time.monotonic() < deadline, "difflab serve did not answer /healthz within 60 s"
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                    assert json.load(response)["run"] == text_run.name
                    break
            except OSError:
                time.sleep(0.2)
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        expect(page.locator("#solver option")).not_to_have_count(0)
        page.fill("#prompt", "a red ring")
        page.fill("#count", "2")
        page.fill("#steps", "4")
        page.click("#generate")
        expect(page.locator("img.result")).to_have_count(2)
        page.wait_for_function("[...document.querySelectorAll('img.result')].every(img => img.naturalWidth > 0)",
                               timeout=TIMEOUT_MS)
        expect(page.locator("#error")).to_have_text("")
    finally:
        server.terminate()
        server.wait(timeout=20)

"""The web page in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven
by selenium; nothing is downloaded) opens `retr serve`'s page, uploads a landmarks-mini photo,
and sees the landmark, the results grid and a match picture; then the index view. Screenshots
go to the test's folder and, when RETR_SCREENSHOTS names a folder, there too.

.ci/run installs chromium and chromium-driver, so in CI this test runs; elsewhere it is skipped
when they are missing, unless RETR_REQUIRE_SYSTEM=1 (then it fails; tests/conftest.py).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import system_package_missing
from tests.serving import BROKEN, QUERY, Served, live_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT = 180  # seconds: a search on a loaded 2-core machine, with model warm-up

if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
    system_package_missing("Chromium or its driver", "apt-get install chromium chromium-driver")

from selenium import webdriver  # noqa: E402 -- only once the browser is known to be there
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def page_url(served_index: Served) -> Iterator[str]:
    with live_server(served_index.index) as url:
        yield url


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        "--window-size=1280,1200",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(driver: WebDriver, tmp_path: Path, name: str) -> Path:
    """Save a full-page screenshot beside the test (and in $RETR_SCREENSHOTS)."""
    for _ in range(3):  # the window's height includes the browser's own frame
        missing = driver.execute_script(
            "return document.documentElement.scrollHeight - window.innerHeight"
        )
        if missing <= 0:
            break
        size = driver.get_window_size()
        driver.set_window_size(1280, min(size["height"] + int(missing) + 8, 4000))
    driver.execute_script("window.scrollTo(0, 0)")
    path = tmp_path / name
    assert driver.save_screenshot(str(path))
    if os.environ.get("RETR_SCREENSHOTS"):
        keep = Path(os.environ["RETR_SCREENSHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, keep / name)
    return path


def _wait(driver: WebDriver, script: str) -> None:
    WebDriverWait(driver, WAIT, poll_frequency=0.25).until(lambda d: d.execute_script(script))


def test_page_search_results_and_match_picture(
    browser: WebDriver, page_url: str, tmp_path: Path
) -> None:
    browser.get(page_url)
    _wait(browser, "return document.getElementById('health').textContent.includes('images')")
    browser.find_element(By.ID, "file").send_keys(str(QUERY))

    _wait(browser, "return document.getElementById('landmark').textContent !== ''")
    assert browser.find_element(By.ID, "landmark").text == "sacre_coeur"
    assert "confidence" in browser.find_element(By.ID, "confidence").text
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    assert len(cards) == 10
    assert any("✓" in c.text for c in cards)  # a verified result is marked
    _wait(browser, "return [...document.querySelectorAll('#results img')].every(i => i.complete)")
    loaded = "return [...document.querySelectorAll('#results img')].every(i => i.naturalWidth > 0)"
    assert browser.execute_script(loaded)  # the thumbnails came from /images/{id}?size=

    cards[0].click()
    _wait(
        browser,
        "const i = document.getElementById('match-img'); return i.complete && i.naturalWidth > 0",
    )
    caption = browser.find_element(By.ID, "match-caption").text
    assert caption.startswith("query ↔ ") and "sacre_coeur" in caption
    assert _screenshot(browser, tmp_path, "page-search.png").stat().st_size > 10_000

    browser.find_element(By.ID, "tab-index").click()
    _wait(browser, "return document.querySelectorAll('#images tbody tr').length > 0")
    info = browser.find_element(By.ID, "info").text
    assert "images indexed 12" in info and "images failed 1" in info
    failed = browser.find_element(By.ID, "failed").text
    assert failed == f"{BROKEN}: empty file (0 bytes)"
    _screenshot(browser, tmp_path, "page-index.png")


def test_page_reports_a_bad_upload(browser: WebDriver, page_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not a photo")
    browser.get(page_url)
    browser.find_element(By.ID, "file").send_keys(str(bad))
    _wait(browser, "return document.getElementById('status').textContent.startsWith('error')")
    status = browser.find_element(By.ID, "status").text
    assert status == "error: 400: notes.jpg: not an image, or a format Pillow cannot read"


def test_page_with_private_reads_works_once_the_token_is_entered(
    browser: WebDriver, served_index: Served
) -> None:
    token = "page-s3cret"
    with live_server(served_index.index, "--token", token, "--private-reads") as url:
        browser.get(url)
        browser.find_element(By.ID, "tab-index").click()  # no token yet: the API refuses
        _wait(browser, "return document.getElementById('info').textContent.includes('401')")
        field = browser.find_element(By.ID, "token")
        field.send_keys(token)
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)
        _wait(browser, "return document.querySelectorAll('#images tbody tr').length > 0")
        rows = browser.find_elements(By.CSS_SELECTOR, "#images tbody tr")
        assert all(r.find_elements(By.CSS_SELECTOR, "button.remove") for r in rows)
        thumbs = "[...document.querySelectorAll('#images img')]"
        _wait(browser, f"return {thumbs}.every(i => i.complete && i.naturalWidth > 0)")
        assert browser.execute_script(f"return {thumbs}.every(i => i.src.startsWith('blob:'))")
        browser.find_element(By.ID, "tab-search").click()
        browser.find_element(By.ID, "file").send_keys(str(QUERY))
        _wait(browser, "return document.getElementById('landmark').textContent !== ''")
        assert browser.find_element(By.ID, "landmark").text == "sacre_coeur"


def test_remove_buttons_show_only_with_the_token_a_service_needs(
    browser: WebDriver, served_index: Served
) -> None:
    with live_server(served_index.index, "--token", "t0ken") as url:
        browser.get(url)
        browser.find_element(By.ID, "tab-index").click()
        _wait(browser, "return document.querySelectorAll('#images tbody tr').length > 0")
        assert not browser.find_elements(By.CSS_SELECTOR, "#images button.remove")

"""The web page in a real browser: headless Chromium (Debian's chromium + chromium-driver, via selenium)
against the real server on a loopback port. Upload a clip, teach a label, see it classify a held-out
clip, forget it. Saves a screenshot to tmp_path, and to $EARMARK_SERVICE_SCREENSHOT when set.

Skipped only where Chromium is missing and $CI is unset; in CI a missing browser fails loudly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from earmark.service.testing import (  # noqa: E402
    BASE_SOUNDS,
    NEW_SOUND,
    TOKEN,
    ServerProcess,
    build_model,
    write_clip,
    write_clips,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT_ENV = "EARMARK_SERVICE_SCREENSHOT"


def _browser(profile: Path):
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI: chromium and chromium-driver must be installed for the browser test "
                        "(apt-get install chromium chromium-driver)")
        pytest.skip("chromium / chromedriver not installed")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI: selenium must be installed (dev extra)")
        pytest.skip("selenium not installed")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={profile}", "--window-size=1280,900"):
        opts.add_argument(flag)
    os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium manager: no telemetry (it is not needed here)
    return webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))


def test_page_classify_teach_forget(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser(tmp_path / "profile")
    model = build_model(tmp_path / "model")
    srv = ServerProcess(model, log_path=tmp_path / "server.log").start()
    name, freq = NEW_SOUND
    low = write_clip(tmp_path / "clips" / "what-is-this.wav", BASE_SOUNDS["low"], seed=901)
    train = write_clips(tmp_path / "clips", name, freq, 5)
    held_out = write_clip(tmp_path / "clips" / f"{name}-held-out.wav", freq, seed=999)
    wait = WebDriverWait(driver, 30)
    css = lambda sel: driver.find_element(By.CSS_SELECTOR, sel)  # noqa: E731

    def top_label() -> str | None:
        cards = driver.find_elements(By.CSS_SELECTOR, "#classify-results .result")
        return cards[0].get_attribute("data-top") if cards else None

    try:
        driver.get(srv.url + "/")
        wait.until(lambda d: "ready" in css("#status").text)
        assert {r.get_attribute("data-label") for r in driver.find_elements(By.CSS_SELECTOR, "#labels tr")} \
            == set(BASE_SOUNDS)

        # classify an upload
        css("#classify-input").send_keys(str(low))
        wait.until(lambda d: top_label() == "low")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#classify-results .bar")) == len(BASE_SOUNDS)

        # teach a label from five clips (no token first: the API's refusal is shown)
        css("#teach-label").send_keys(name)
        css("#teach-input").send_keys("\n".join(str(p) for p in train))
        assert len(driver.find_elements(By.CSS_SELECTOR, "#teach-clips li")) == 5
        css("#teach-button").click()
        wait.until(lambda d: "bearer" in css("#teach-status").text.lower())
        css("#token").send_keys(TOKEN)
        css("#teach-button").click()
        wait.until(lambda d: "learned 5" in css("#teach-status").text)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#labels tr[data-label="{name}"]'))
        row = css(f'#labels tr[data-label="{name}"]')
        assert row.find_elements(By.TAG_NAME, "td")[1].text == "5"

        # the new label classifies a held-out clip
        css("#classify-input").send_keys(str(held_out))
        wait.until(lambda d: top_label() == name)
        shot = tmp_path / "service-page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get(SCREENSHOT_ENV):
            target = Path(os.environ[SCREENSHOT_ENV])
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, target)

        # forget it
        css(f'button.forget[data-label="{name}"]').click()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, f'#labels tr[data-label="{name}"]'))
        assert "forgot" in css("#labels-status").text
        css("#classify-input").send_keys(str(held_out))
        wait.until(lambda d: top_label() not in (None, name) and "classifying" not in
                   css("#classify-results").text)
        logs = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"
                and "401" not in e.get("message", "")]
        assert not logs, logs
    finally:
        driver.quit()
        srv.stop()

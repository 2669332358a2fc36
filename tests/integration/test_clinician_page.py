"""The clinician's page (serving/static/index.html at /ui/) in headless Chromium against the real
service: a slice chosen in the page shows the class, one probability bar per class and the Grad-CAM
overlay, and the class equals what the classify endpoint answers for the same file; a blank slice
shows the referral banner with its reason."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from helpers.browser import browser
from helpers.images import phantom_pngs, png_bytes
from helpers.requirements import needs_chromium

# One session Bento server, on one xdist worker (tests/integration/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("bento")]


@needs_chromium
def test_a_dropped_slice_shows_class_probabilities_and_overlay(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    name, data = next((n, d) for n, d in phantom_pngs(1).items() if "Tumor" in n)
    slice_path = tmp_path / name
    slice_path.write_bytes(data)
    expected = httpx.post(f"{served.url}/classify", files={"file": (name, data, "image/png")}, timeout=60).json()

    driver = browser()
    try:
        driver.get(f"{served.url}/ui/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "version").text not in ("", "-"))
        assert driver.find_element(By.ID, "version").text == expected["model_version"]
        driver.find_element(By.ID, "file").send_keys(str(slice_path))
        wait.until(lambda d: d.find_element(By.ID, "result").is_displayed())
        verdict = driver.find_element(By.ID, "verdict").text
        assert verdict.startswith(expected["class"] + " (")
        bars = driver.find_elements(By.CSS_SELECTOR, "#bars .row")
        assert [b.get_attribute("data-class") for b in bars] == list(expected["probabilities"])
        overlay = driver.find_element(By.ID, "overlay")
        assert overlay.get_attribute("src").startswith("data:image/png;base64,")
        assert driver.execute_script("return arguments[0].naturalWidth", overlay) > 0  # the PNG decoded
        assert driver.find_element(By.ID, "alert").is_displayed() == expected["alert"]
        driver.save_screenshot(str(tmp_path / "page.png"))
        refer = driver.find_element(By.ID, "refer")
        assert refer.is_displayed() == expected["refer"]
        if expected["prediction_set"]:
            assert driver.find_element(By.ID, "set").text == "Prediction set: " + " / ".join(expected["prediction_set"])
        assert driver.find_element(By.ID, "plane").text == f"Estimated orientation: {expected['orientation']}"

        # A blank slice: the referral banner, with the service's reason, above the class.
        blank = tmp_path / "blank.png"
        blank.write_bytes(png_bytes(np.full((96, 96), 255, np.uint8)))
        driver.find_element(By.ID, "file").send_keys(str(blank))
        wait.until(lambda d: "blank" in d.find_element(By.ID, "refer").text)  # the previous answer may be referred too
        banner = driver.find_element(By.ID, "refer")
        assert banner.is_displayed() and banner.text.startswith("Refer to a radiologist: do not rely on this answer.")
        assert banner.text.splitlines()[-1] == httpx.post(f"{served.url}/classify", files={"file": (
            "blank.png", blank.read_bytes(), "image/png")}, timeout=60).json()["refer_reason"]
        driver.save_screenshot(str(tmp_path / "page-referred.png"))

        # A file that is not an image: the page shows the service's one-line reason, no result.
        bad = tmp_path / "notes.png"
        bad.write_bytes(b"not an image at all")
        driver.find_element(By.ID, "file").send_keys(str(bad))
        wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
        assert driver.find_element(By.ID, "error").text.startswith("notes.png: ")
        assert not driver.find_element(By.ID, "result").is_displayed()
    finally:
        driver.quit()

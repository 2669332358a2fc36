"""Headless Chromium through Selenium, with Debian's driver (Selenium Manager would download one)."""

from __future__ import annotations

from helpers.requirements import CHROMEDRIVER, CHROMIUM


def browser(window_size: str = "1100,820"):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={window_size}"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def enter_key(driver, wait, key: str) -> None:
    """Answer the clinician page's key form."""
    from selenium.webdriver.common.by import By

    wait.until(lambda d: d.find_element(By.ID, "keyform").is_displayed())
    driver.find_element(By.ID, "apikey").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#keyform button").click()


def sign_in(driver, url: str, key: str):
    """Open the clinician page with ``key``; returns the page's wait (60 s) once the model is shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/ui/")
    wait = WebDriverWait(driver, 60)
    enter_key(driver, wait, key)
    wait.until(lambda d: d.find_element(By.ID, "version").text not in ("", "-"))
    return wait


def open_review_item(driver, wait, item: str) -> None:
    """Click a queued item in the open review section and wait until it is shown."""
    from selenium.webdriver.common.by import By

    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#reviewlist button[data-item="{item}"]'))
    driver.find_element(By.CSS_SELECTOR, f'#reviewlist button[data-item="{item}"]').click()
    wait.until(lambda d: d.find_element(By.ID, "reviewid").text == item)

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

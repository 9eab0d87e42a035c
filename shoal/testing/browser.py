"""Headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by
selenium, for the dashboard's browser tests and the README screenshots.

    with headless_chromium(width=1280, height=900) as driver:
        driver.get(url)
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "g.edge"))
        driver.save_screenshot(str(artifact_dir() / "dashboard.png"))

``available()`` says why the browser cannot run here ("" when it can), so a
test can skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def available() -> str:
    """"" if headless Chromium can be driven here, else why not."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install {pkg})"
    return ""


def artifact_dir() -> Path:
    """$SHOAL_ARTIFACTS (made if missing), else a fresh temporary directory."""
    given = os.environ.get("SHOAL_ARTIFACTS")
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="shoal-artifacts-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def headless_chromium(*, width: int = 1280, height: int = 900) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="shoal-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", "--hide-scrollbars",
                f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: Any, condition: Callable[[Any], Any], *, timeout: float = 60.0,
             what: str = "") -> Any:
    """selenium's WebDriverWait: the condition's first truthy value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, what)

"""The web page at ``/`` in a real headless browser (Debian's chromium and chromium-driver, driven
by selenium): submit a prompt, watch the queue, see the image and its recipe."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from helpers import Server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx2")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no browser: the web page test needs Debian's chromium and chromium-driver "
    "(apt-get install -y chromium chromium-driver)",
)


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="latentdiff-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_the_page_queues_a_prompt_and_shows_the_image_with_its_recipe(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = Server(tmp_path / "data").start()
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 90)
        wait.until(lambda d: "preset-tiny" in d.find_element(By.ID, "model").text)
        # a slow job from another client shows up in the live queue with its progress
        with server.client() as client:
            slow = client.post("/v1/jobs", json={"prompt": "from another client", "seed": 1, "num_inference_steps": 60,
                                                 "num_images_per_prompt": 3}).json()  # fmt: skip
        box = f'.job[data-id="{slow["id"]}"]'
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, box))
        wait.until(lambda d: "step" in d.find_element(By.CSS_SELECTOR, f"{box} .state").text)

        for field, value in (("prompt", "a yellow star in the center"), ("seed", "42"), ("steps", "2"), ("guidance", "4")):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        browser.find_element(By.ID, "submit").click()
        done = '.job[data-state="done"]'

        def finished_image(d):
            for job in d.find_elements(By.CSS_SELECTOR, done):
                if "yellow star" in job.find_element(By.CSS_SELECTOR, ".prompt").text:
                    images = job.find_elements(By.CSS_SELECTOR, "figure img")
                    if images and d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", images[0]):
                        return job
            return False

        job = wait.until(finished_image)
        caption = job.find_element(By.CSS_SELECTOR, "figcaption").text
        assert "seed 42, 2 steps, guidance 4" in caption and "64x64" in caption
        assert browser.find_element(By.ID, "message").text == ""
        # a bad value is refused with the server's message, naming the field
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("0")
        browser.execute_script("document.getElementById('steps').removeAttribute('min')")
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: "num_inference_steps" in d.find_element(By.ID, "message").text)
    finally:
        server.stop()

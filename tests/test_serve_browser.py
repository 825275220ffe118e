"""The web chat page of ``lmlab serve`` in headless Chromium: send messages, read the streamed replies.

Needs ``chromium`` and ``chromium-driver`` (Debian packages) and the
``selenium`` Python package; skipped cleanly where any is missing.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e .[serve])")

from test_serve import write_model  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def driver(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager reach for the network
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def test_chat_page_streams_multi_turn_replies(driver, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from lmlab.models.generation import generate
    from lmlab.serving.server import ServerThread, build_service, create_app

    service = build_service(str(write_model(tmp_path)), device="cpu", model_name="tiny")
    srv = ServerThread(create_app(service)).start()
    try:
        driver.get(srv.url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        for id_, value in (("temperature", "0"), ("max_tokens", "12")):
            box = driver.find_element(By.ID, id_)
            box.clear()
            box.send_keys(value)
        history = []
        for turn, text in enumerate(("the cat sat", "and then?")):
            driver.find_element(By.ID, "input").send_keys(text + "\n")
            history.append({"role": "user", "content": text})
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.assistant[data-done="true"]')) == turn + 1)
            ids = service.prompter.chat_ids(history)
            stops = service.prompter.stop_ids(True)
            out = generate(service.engine.model, torch.tensor([ids]), max_new_tokens=12, temperature=0, stop_token_ids=stops)
            want = service.engine.tokenizer.decode([t for t in out.responses[0][out.response_mask[0].bool()].tolist()
                                                    if t not in stops], skip_special_tokens=True)
            got = driver.execute_script("return document.querySelectorAll('.assistant')[arguments[0]].textContent", turn)
            assert got == want  # the second turn's prompt carries the first turn: the page keeps the history
            history.append({"role": "assistant", "content": got})
        assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".user")] == ["the cat sat", "and then?"]
    finally:
        srv.stop()

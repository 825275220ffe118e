"""The judging page end to end in headless Chromium: keyboard shortcuts, buttons, storage, results.

Needs ``chromium`` and ``chromium-driver`` (Debian packages) and the
``selenium`` Python package; skipped cleanly where any is missing. Set
``LMLAB_COMPARE_SCREENSHOT=/path/shot.png`` to keep a screenshot of the page.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import urllib.request
from functools import partial
from pathlib import Path

import pytest

from lmlab.eval.compare.pairs import parse_prompt
from lmlab.eval.compare.report import build_report
from lmlab.eval.compare.server import CompareApp, CompareServer
from lmlab.eval.compare.session import prepare_pairs
from lmlab.eval.compare.store import JudgmentStore

CHOICE = {"a": 0, "b": 1, "tie": 2}
ROW_KEYS = {"overall": "123", "helpfulness": "qwe", "harmlessness": "asd", "honesty": "zxc"}


@pytest.fixture
def server(tmp_path):
    prompts = [parse_prompt(f"Explain idea number {i} in one sentence.", "t") for i in range(3)]
    generators = {
        "good": lambda ps: [f"GOOD: a careful answer to '{p}'" for p in ps],
        "poor": lambda ps: [f"POOR: {p.split()[0]}?" for p in ps],
    }
    store = JudgmentStore(tmp_path / "judgments.sqlite")
    pairs = prepare_pairs(store, generators, prompts, seed=0)
    srv = CompareServer(CompareApp(store, pairs, report=partial(build_report, n_bootstrap=50))).start()
    yield srv, store, pairs
    srv.shutdown()
    store.close()


def test_judge_all_pairs_with_the_keyboard(driver, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    srv, store, pairs = server
    wait = WebDriverWait(driver, 30)
    driver.get(srv.url)
    state = lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")  # noqa: E731
    wait.until(lambda d: state() == "ready")
    body = driver.find_element(By.TAG_NAME, "body")
    assert driver.find_element(By.ID, "progress-text").text == "0 / 3 judged"

    pressed: dict[str, dict[str, str]] = {}
    shot = tmp_path / "compare_page.png"
    for n in range(len(pairs)):
        pid = body.get_attribute("data-pair-id")
        response_a = driver.find_element(By.ID, "response-a").text
        good_side = "a" if response_a.startswith("GOOD") else "b"
        # the last pair is called a tie; otherwise the careful answer wins overall and on helpfulness
        want = {
            "overall": "tie" if n == len(pairs) - 1 else good_side,
            "helpfulness": good_side,
            "harmlessness": "tie",
            "honesty": "a",
        }
        body.send_keys(ROW_KEYS["overall"][CHOICE[want["overall"]]])
        body.send_keys(Keys.ENTER)  # incomplete: must not submit
        assert driver.find_element(By.ID, "submit").get_attribute("disabled") is not None
        body.send_keys(ROW_KEYS["helpfulness"][CHOICE[want["helpfulness"]]], ROW_KEYS["honesty"][0])
        if n == 0:  # one judgment goes through the buttons, to cover clicks too
            driver.find_element(By.CSS_SELECTOR, 'button[data-criterion="harmlessness"][data-choice="tie"]').click()
        else:
            body.send_keys(ROW_KEYS["harmlessness"][CHOICE["tie"]])
        for crit, choice in want.items():  # what the page shows selected is what was pressed
            selected = driver.find_elements(By.CSS_SELECTOR, f'button[data-criterion="{crit}"][aria-pressed="true"]')
            assert [b.get_attribute("data-choice") for b in selected] == [choice]
        if n == 1:
            assert driver.save_screenshot(str(shot))
        with sqlite3.connect(store.path) as conn:
            assert conn.execute("SELECT COUNT(*) FROM judgments").fetchone()[0] == n  # nothing stored before Enter
        pressed[pid] = want
        body.send_keys(Keys.ENTER)
        wait.until(lambda d: state() == "done" or (state() == "ready" and body.get_attribute("data-pair-id") != pid))

    wait.until(lambda d: state() == "done")
    assert driver.find_element(By.ID, "progress-text").text == "3 / 3 judged"
    rows = driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == ["good", "poor"]

    with sqlite3.connect(store.path) as conn:
        stored = conn.execute("SELECT pair_id, overall, helpfulness, harmlessness, honesty, source FROM judgments ORDER BY id").fetchall()
    assert [r[0] for r in stored] == [p.pair_id for p in pairs]  # judged in the page's order, each once
    for pid, overall, helpfulness, harmlessness, honesty, source in stored:
        assert (overall, helpfulness, harmlessness, honesty, source) == (*pressed[pid].values(), "web")

    res = json.loads(urllib.request.urlopen(srv.url + "api/results", timeout=10).read())
    overall = {m["model"]: m for m in res["criteria"]["overall"]["models"]}
    assert (overall["good"]["wins"], overall["good"]["ties"], overall["good"]["losses"]) == (2, 1, 0)
    assert overall["good"]["win_rate"] == pytest.approx(2.5 / 3)
    assert overall["poor"]["win_rate"] == pytest.approx(0.5 / 3)
    helpful = {m["model"]: m for m in res["criteria"]["helpfulness"]["models"]}
    assert helpful["good"]["win_rate"] == 1.0
    # "honesty: A" every time, so honesty depends only on which side each model was shown
    sides = {p.pair_id: p.model_a for p in pairs}
    honest_wins = sum(1 for pid in pressed if sides[pid] == "good")
    assert {m["model"]: m["wins"] for m in res["criteria"]["honesty"]["models"]}["good"] == honest_wins
    assert res["choice_counts"]["honesty"] == {"a": 3, "b": 0, "tie": 0}

    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("LMLAB_COMPARE_SCREENSHOT")
    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep)

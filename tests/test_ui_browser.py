"""End to end: the compare page served on localhost with tiny models, driven by headless Chromium (Selenium with
Debian's chromium and chromium-driver; scripts/install-browser.sh installs them). Picks two models and an
evaluation example, asks, and reads both answers and their pass/fail; saves a screenshot.

Screenshot: $KUBETUNE_TEST_ARTIFACTS/ui/compare.png (default .cache/test-artifacts/ui/), printed by the test.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import require_binary
from kubetune.ui.backend import ModelPool, eval_examples, open_run
from kubetune.ui.memory import gpu_memory
from kubetune.ui.settings import Bind
from test_ui_backend import tiny_ui_run

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60  # generous: two cores shared with other tests; each wait returns as soon as the page is ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, tiny_model_dir) -> Path:
    return tiny_ui_run(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def browser():
    chromium = require_binary("chromium")
    chromedriver = require_binary("chromedriver")
    # selenium is pinned in pyproject.toml's test extra: missing, the test fails rather than skipping
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1400,1600"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def served(run_root):
    """(url, app, pool) of the page on a free localhost port; closed after the test."""
    from kubetune.ui.app import launch

    info = open_run("tiny", run_root)
    pool = ModelPool(info)
    port = free_port()
    app = launch(pool, eval_examples(info), Bind("127.0.0.1", port, "test"), block=False, refresh_s=1.0)
    yield f"http://127.0.0.1:{port}/", app, pool
    app.close()
    pool.close()


def artifacts_dir() -> Path:
    base = Path(os.environ.get("KUBETUNE_TEST_ARTIFACTS") or ROOT / ".cache" / "test-artifacts")
    path = base / "ui"
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_pick_two_models_ask_see_answers_and_verdicts(browser, served, run_root):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, app, pool = served
    assert app.share is False and app.share_url is None  # never a public link
    # The memory panel is re-rendered every second and the checkboxes after each load: an element found a
    # moment ago may be gone; the waits look again instead of failing.
    wait = WebDriverWait(browser, TIMEOUT_S, ignored_exceptions=[StaleElementReferenceException])
    browser.get(url)
    info = pool.info

    def tick(name: str) -> None:
        # The checkbox group is re-rendered after each load (it shows what is really loaded): find it afresh
        # and retry when it was replaced between finding and clicking.
        def attempt(d):
            d.find_element(By.CSS_SELECTOR, f"#kt-models input[name='{name}']").click()
            return True
        wait.until(attempt)

    def status_lists(names) -> None:
        wait.until(lambda d: all(info.labels[n] in d.find_element(By.ID, "kt-status").text for n in names))

    # pick two models: each tick loads one (the status line lists what is really loaded)
    tick("base")
    status_lists(["base"])
    tick("merged")
    status_lists(["base", "merged"])
    assert pool.names() == ["base", "merged"]

    # pick an evaluation example: it fills schema, question and gold
    example = eval_examples(info)[2]
    browser.find_element(By.CSS_SELECTOR, "#kt-example input").click()
    option = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#kt-example li[role='option'][data-index='2']")))
    assert option.get_attribute("aria-label") == example.title
    option.click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#kt-question textarea, #kt-question input")
               .get_attribute("value") == example.question)
    gold_box = browser.find_element(By.CSS_SELECTOR, "#kt-gold textarea, #kt-gold input")
    assert gold_box.get_attribute("value") == example.gold

    browser.find_element(By.ID, "kt-ask").click()
    cards = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#kt-answers .kt-card[data-verdict]")
                       if len(d.find_elements(By.CSS_SELECTOR, "#kt-answers .kt-card[data-verdict]")) == 2
                       else False)
    by_model = {c.get_attribute("data-model"): c for c in cards}
    assert set(by_model) == {"base", "merged"}
    for name, card in by_model.items():
        # the answer on the page is the infer stage's answer for this row, and the verdict is evaluate's
        row = [json.loads(x) for x in (run_root / "tiny" / "infer" / f"predictions-{name}.jsonl").open()][2]
        outcome = [json.loads(x) for x in (run_root / "tiny" / "evaluate" / f"outcomes-{name}.jsonl").open()][2]
        sql = card.find_element(By.CSS_SELECTOR, ".kt-sql").text
        assert sql == (row["prediction"] or "(empty answer)")
        verdict = card.get_attribute("data-verdict")
        assert verdict == ("pass" if outcome["execution_match"] else "fail")
        assert ("PASS" if verdict == "pass" else "FAIL") in card.text
        assert "tokens/s" in card.text and info.labels[name] in card.text
    gold_card = browser.find_element(By.CSS_SELECTOR, "#kt-answers .kt-card[data-model='gold']")
    assert example.gold in gold_card.text and "row" in gold_card.text  # the gold's result table

    def memory_lists(d):
        """The models the memory panel lists as loaded."""
        return {e.get_attribute("data-loaded") for e in d.find_elements(By.CSS_SELECTOR, "#kt-memory [data-loaded]")}

    wait.until(lambda d: memory_lists(d) == {"base", "merged"})
    if gpu_memory() is None:
        assert "no GPU" in browser.find_element(By.ID, "kt-memory").text

    shot = artifacts_dir() / "compare.png"
    browser.save_screenshot(str(shot))
    print(f"\nscreenshot: {shot}")
    assert shot.stat().st_size > 10_000

    # untick base: it is freed, and the memory panel (on its timer) stops listing it
    tick("base")
    wait.until(lambda d: memory_lists(d) == {"merged"})
    assert pool.names() == ["merged"]


def test_login_is_required_when_auth_is_set(run_root):
    from kubetune.ui.app import launch

    info = open_run("tiny", run_root)
    pool = ModelPool(info)
    port = free_port()
    app = launch(pool, [], Bind("127.0.0.1", port, "test"), auth=("ana", "s3cret"), block=False)
    try:
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10)
        assert denied.value.code == 401
        login = urllib.request.Request(f"http://127.0.0.1:{port}/login", method="POST",
                                       data=b"username=ana&password=s3cret",
                                       headers={"Content-Type": "application/x-www-form-urlencoded"})
        with urllib.request.urlopen(login, timeout=10) as response:
            assert response.status == 200
            cookie = response.headers.get("set-cookie", "")
        assert cookie, "a successful login sets the session cookie"
        wrong = urllib.request.Request(f"http://127.0.0.1:{port}/login", method="POST",
                                       data=b"username=ana&password=nope",
                                       headers={"Content-Type": "application/x-www-form-urlencoded"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(wrong, timeout=10)
        assert refused.value.code in (400, 401)
    finally:
        app.close()

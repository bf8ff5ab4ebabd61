"""End to end in a real headless Chromium: log in, label three pairs with the keyboard, check the
store. Needs Debian's chromium + chromium-driver (tests/feedback/install_chromium.sh).

ALIGNKIT_SCREENSHOT=docs/annotate.png additionally saves a screenshot of the labelling page.
"""

from __future__ import annotations

import os
import shutil
import threading

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("ALIGNKIT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ALIGNKIT_CHROMEDRIVER", "/usr/bin/chromedriver")
if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
    pytest.skip(
        f"needs Chromium ({CHROMIUM}) and chromedriver ({CHROMEDRIVER}); "
        "run tests/feedback/install_chromium.sh",
        allow_module_level=True,
    )
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="needs selenium (pip install selenium)"
)

from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

from alignkit.feedback.annotate.app import create_app  # noqa: E402
from alignkit.data.store import PreferenceStore  # noqa: E402

PAIRS = [
    (
        "Explain what a hash table is in one sentence.",
        "A hash table maps keys to values by hashing each key to an index in an array, giving "
        "average constant-time lookups.",
        "It is a table where you put hashes.\n<script>alert(1)</script>",
    ),
    ("Suggest a name for a grey cat.", "Earl Grey", "Dog"),
    ("What is 12 * 12?", "144", "124"),
    ("Translate 'thank you' into French.", "Merci", "Gracias"),
]


@pytest.fixture
def server(tmp_path):
    db = tmp_path / "prefs.db"
    with PreferenceStore(db) as s:
        for prompt, a, b in PAIRS:
            s.add_pair_from_texts(prompt, a, b, model_a="policy-v2", model_b="policy-v1")
        token = s.add_annotator("ada", admin=True)
    httpd = make_server("127.0.0.1", 0, create_app(db, secret_key="browser-test"), threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", db, token
    httpd.shutdown()
    thread.join(timeout=10)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-extensions",
        "--window-size=1100,760",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager is never consulted, nothing is downloaded.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _labelled(driver) -> int:
    return int(driver.find_element(By.ID, "n-labelled").text)


def test_log_in_and_label_three_pairs_with_the_keyboard(server, browser):
    url, db, token = server
    wait = WebDriverWait(
        browser, 20, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
    )
    browser.get(url + "/")
    assert browser.current_url.endswith("/login")
    browser.find_element(By.ID, "token").send_keys(token + "\n")
    wait.until(lambda d: d.find_elements(By.ID, "label-form"))
    assert browser.find_element(By.ID, "who").text == "ada"
    assert browser.find_element(By.ID, "n-total").text == "4"
    # The script in the first response is shown as text, never run.
    assert "<script>alert(1)</script>" in browser.find_element(By.TAG_NAME, "main").text
    if os.environ.get("ALIGNKIT_SCREENSHOT"):
        browser.find_element(By.ID, "comment").send_keys("Accuracy matters more than length here.")
        browser.save_screenshot(os.environ["ALIGNKIT_SCREENSHOT"])
        browser.find_element(By.ID, "comment").clear()

    shown = []
    body = browser.find_element(By.TAG_NAME, "body")
    for n, key in enumerate(["1", "b", "t"]):
        shown.append(
            (
                int(browser.find_element(By.ID, "pair-id").get_attribute("value")),
                browser.find_element(By.ID, "left").text,
            )
        )
        body.send_keys(key)
        wait.until(lambda d, n=n: _labelled(d) == n + 1)
        body = browser.find_element(By.TAG_NAME, "body")
    # Keys typed into the comment box are text, not shortcuts; Escape leaves the box.
    comment = browser.find_element(By.ID, "comment")
    comment.send_keys("1 b t")
    assert comment.get_attribute("value") == "1 b t"
    comment.send_keys(Keys.ESCAPE)
    browser.find_element(By.TAG_NAME, "body").send_keys("s")
    wait.until(lambda d: d.find_elements(By.ID, "done"))
    assert _labelled(browser) == 3

    with PreferenceStore(db) as s:
        rows = s.comparisons(source="human")
        progress = s.progress("ada")
    assert [r["pair_id"] for r in rows] == [p for p, _ in shown] and len({p for p, _ in shown}) == 3
    for row, (_, left), label in zip(rows, shown, ["left", "right", "tie"], strict=True):
        assert row["annotator"] == "ada"
        shown_left_text = row["response_a"] if row["shown_left"] == "a" else row["response_b"]
        assert shown_left_text.strip() == left.strip()
        other = "b" if row["shown_left"] == "a" else "a"
        assert row["label"] == {"left": row["shown_left"], "right": other, "tie": "tie"}[label]
    assert progress == {"labelled": 3, "skipped": 1, "remaining": 0, "total": 3}

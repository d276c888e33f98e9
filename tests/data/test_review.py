"""Review: candidates most uncertain first, labels saved atomically, classifier retrained; a real browser."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lmforge.data.garbage import FEATURES
from lmforge.atomic import atomic_write_jsonl
from lmforge.data.review import ReviewStore, make_server


def item(i: int, score: float, garbage_like: bool) -> dict:
    feats = {name: 0.0 for name in FEATURES}
    feats.update(symbol_ratio=0.6 if garbage_like else 0.02, wordlike_ratio=0.1 if garbage_like else 0.9,
                 log_words=3.0 + i % 3)
    return {"id": f"id{i}", "source": "/x/doc.pdf", "page": i, "page_end": i, "score": score,
            "reasons": ["symbol_ratio=0.60 > 0.2"], "label": None, "text": f"candidate number {i}",
            "features": feats}


@pytest.fixture
def out(tmp_path) -> Path:
    atomic_write_jsonl(tmp_path / "garbage.jsonl", [item(0, 0.99, True), item(1, 0.52, False),
                                                    item(2, 0.70, True), item(3, 0.55, False),
                                                    item(4, 0.95, True), item(5, 0.60, False)])
    return tmp_path


@pytest.fixture
def server(out):
    srv = make_server(out, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_most_uncertain_first(out):
    assert [r["id"] for r in ReviewStore(out).ranked()] == ["id1", "id3", "id5", "id2", "id4", "id0"]


def test_labels_are_saved_and_retrain(out):
    store = ReviewStore(out)
    for i, label in [(0, "discard"), (1, "keep"), (2, "discard")]:
        store.label(f"id{i}", label)
    assert not (out / "garbage_model.json").exists()  # one keep: not enough to train
    counts = store.label("id3", "keep")
    assert counts == {"keep": 2, "discard": 2, "model_labels": 4}
    assert json.loads((out / "garbage_model.json").read_text())["n_keep"] == 2
    labels = json.loads((out / "labels.json").read_text())
    assert {k: v["label"] for k, v in labels.items()} == {"id0": "discard", "id1": "keep", "id2": "discard",
                                                         "id3": "keep"}
    assert not list(out.glob(".*.tmp"))
    ranked = ReviewStore(out).ranked()
    assert [r["label"] for r in ranked[:2]] == [None, None]  # unlabelled first


def test_http_api(server, out):
    with urllib.request.urlopen(server + "/api/items", timeout=10) as r:
        body = json.load(r)
    assert body["items"][0]["id"] == "id1" and "features" not in body["items"][0]
    assert post(server + "/api/label", {"id": "id1", "label": "keep"})[0] == 200
    status, err = post(server + "/api/label", {"id": "id1", "label": "maybe"})
    assert status == 400 and "keep" in err["error"]
    status, err = post(server + "/api/label", {"id": "nope", "label": "keep"})
    assert status == 400 and "unknown item" in err["error"]
    assert json.loads((out / "labels.json").read_text())["id1"]["label"] == "keep"


def test_review_needs_an_ingest_output(tmp_path):
    with pytest.raises(ValueError, match="lmforge ingest"):
        ReviewStore(tmp_path)


def _browser():
    """A headless Chromium driven by the system chromedriver, or a skip with the reason."""
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("chromium and chromium-driver are not installed (scripts/setup_data_deps.sh installs them)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="lmforge-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
    except Exception as err:  # noqa: BLE001 -- a broken browser install is an environment problem
        subprocess.run(["rm", "-rf", profile])
        pytest.skip(f"cannot start headless chromium: {err}")
    return driver, profile


def test_browser_click_through(server, out):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver, profile = _browser()
    try:
        driver.set_page_load_timeout(30)
        driver.get(server + "/")
        wait = WebDriverWait(driver, 15)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".card")))
        cards = driver.find_elements(By.CSS_SELECTOR, ".card")
        assert [c.get_attribute("data-id") for c in cards] == ["id1", "id3", "id5", "id2", "id4", "id0"]
        plan = {"id1": "keep", "id3": "keep", "id5": "discard", "id2": "discard"}
        for card in cards[:4]:
            label = plan[card.get_attribute("data-id")]
            card.find_element(By.CSS_SELECTOR, f"button.{label}").click()
            wait.until(lambda d, c=card, lab=label: c.get_attribute("data-saved") == lab)
        assert driver.find_element(By.ID, "n-keep").text == "2"
        assert driver.find_element(By.ID, "n-model").text == "4"
        assert "kept" in cards[0].text
    finally:
        driver.quit()
        subprocess.run(["rm", "-rf", profile])
    labels = json.loads((out / "labels.json").read_text())
    assert {k: v["label"] for k, v in labels.items()} == plan
    assert (out / "garbage_model.json").exists()

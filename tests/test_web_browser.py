"""The atlas in a real browser: Debian's chromium, headless, driven by Playwright, against the
app served by uvicorn on 127.0.0.1. Loads the list, opens an experiment (its KLD curves draw),
checks that markup in a hypothesis stays text, that the landscape plot draws one SVG point per
arm and that clicking a point opens its experiment. Each list row is one arm's: the primary arm's
result, confidence and metrics on the same row; imported claims come last; no request fails (the
favicon included). Screenshots go to a temporary folder and,
when $QUANTATLAS_SCREENSHOTS is set, to that folder too. Every request the pages make must go
to the test server."""
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium); "
                f"the browser test drives it through Playwright", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

from test_web_api import HADAMARD, LLAMACPP, SCRIPT, TURBO, build_atlas  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import uvicorn

    from quantatlas.web import create_app

    url = f"sqlite:///{tmp_path_factory.mktemp('browser') / 'atlas.db'}"
    ids = build_atlas(url)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(url), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", ids
    server.should_exit = True
    thread.join(10)


def test_list_experiment_and_landscape_in_chromium(served, tmp_path):
    base, ids = served
    shots = tmp_path / "screenshots"
    shots.mkdir()
    foreign, alerts, failed = [], [], []
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       headless=True, args=ARGS,
                                                       viewport={"width": 1280, "height": 900})
        try:
            def guard(route):
                if urlparse(route.request.url).hostname != "127.0.0.1":
                    foreign.append(route.request.url)
                    return route.abort()
                return route.continue_()

            context.route("**/*", guard)
            page = context.new_page()
            page.on("dialog", lambda d: (alerts.append(d.message), d.dismiss()))
            page.on("console", lambda m: m.type == "error" and failed.append(m.text))
            page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))
            page.set_default_timeout(20000)

            # the list
            page.goto(base + "/")
            rows = page.locator("#experiments tbody tr")
            assert rows.count() == len(ids)
            page.screenshot(path=str(shots / "list.png"), full_page=True)

            # one row, one arm: the primary arm's verdict and metrics together, never the fp16 arm's
            checked = 0
            for tr in rows.all():
                exp_id, primary = tr.get_attribute("data-id"), tr.get_attribute("data-primary")
                verdicts = context.request.get(f"{base}/api/experiments/{exp_id}").json()["verdicts"]
                if not verdicts:
                    continue
                v = next(x for x in verdicts if x["arm"] == primary)
                assert tr.locator("td.result .badge").inner_text() == v["result"], exp_id
                assert tr.locator("td.conf").inner_text() == f"{v['confidence']:.2f}", exp_id
                assert tr.locator("td.metrics .arm").inner_text() == primary and not v.get("reference"), exp_id
                checked += 1
            assert checked == 5
            by_id = {tr.get_attribute("data-id"): tr.get_attribute("data-primary") for tr in rows.all()}
            assert by_id[ids["hadamard"]] == "had_rtn4" and by_id[ids["llamacpp"]] == "q8_0"
            assert rows.last.get_attribute("data-id") == ids["imported"]          # imported claims last

            # open an experiment from the list; its per-token KLD curves draw (one line per arm)
            page.click(f"a[href='/experiments/{ids['hadamard']}']")
            page.wait_for_url(f"**/experiments/{ids['hadamard']}")
            assert ids["hadamard"] in page.locator("h1").inner_text()
            page.wait_for_selector("#kld-1[data-rendered='1']")
            assert page.locator("#kld-1 g.scatterlayer g.trace").count() == len(HADAMARD)
            page.screenshot(path=str(shots / "experiment.png"), full_page=True)

            # markup in a hypothesis is shown as text and never runs
            page.goto(f"{base}/experiments/{ids['markup']}")
            assert page.locator("#hypothesis").inner_text() == SCRIPT
            assert page.locator("#hypothesis script").count() == 0

            # the landscape: one SVG point per arm with bits and KLD > 0, reference points included
            page.goto(base + "/landscape")
            page.wait_for_selector("#landscape-1[data-rendered='1']")
            drawn = len(HADAMARD) + len(TURBO) + (len(LLAMACPP) - 1) + 1        # less the fp16 arm, plus rtn3
            assert page.locator("#landscape-1 g.scatterlayer path.point").count() == drawn
            assert page.locator("#landscape-2 g.scatterlayer path.point").count() == 2
            assert page.locator("#landscape-1 g.scatterlayer g.trace").count() == 3    # frontier, arms, llama.cpp
            page.screenshot(path=str(shots / "landscape.png"), full_page=True)

            # clicking a reference point (the last trace: diamonds) opens its experiment
            box = page.locator("#landscape-1 g.scatterlayer g.trace").nth(2).locator("path.point").first.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.wait_for_url(f"**/experiments/{ids['llamacpp']}")

            page.goto(base + "/composition")
            assert page.locator("td.cell.mixed").count() >= 1
            page.screenshot(path=str(shots / "composition.png"), full_page=True)
        finally:
            context.close()
    assert foreign == [] and alerts == [] and failed == []
    for name in ("list", "experiment", "landscape", "composition"):
        assert (shots / f"{name}.png").stat().st_size > 10_000
    keep = os.environ.get("QUANTATLAS_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for f in shots.iterdir():
            shutil.copy(f, Path(keep) / f.name)

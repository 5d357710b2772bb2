"""The search page end to end in a real headless browser (Debian's chromium and chromium-driver, via selenium).

The server is `isif serve` itself (uvicorn on a free loopback port, in a thread). The browser loads the page,
uploads a query image through the file input, waits for the results, clicks one (which searches again by its
id), opens the clusters tab and a cluster; every request the page made was answered (none refused by the
server's Host, cross-site or Content-Security-Policy checks), while a page of another site (a second loopback
server, on localhost) cannot show the collection's thumbnails. CI installs chromium in .ci/run; there (CI set)
a missing browser fails the test instead of skipping it.
"""

import contextlib
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="FastAPI is not installed (pip install 'isif[serve]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from isif.cli import main  # noqa: E402
from isif.serve.app import serve  # noqa: E402
from isif.serve.options import ServeOptions  # noqa: E402

from .test_embed_scale import photos, run  # noqa: E402,F401  (the module's trained checkpoint)
from .test_serve import make_map  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def browser():
    if not (CHROMIUM and DRIVER):
        msg = "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(msg + "; .ci/run installs them")
        pytest.skip(msg)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=opts)


@contextlib.contextmanager
def serving(emb: Path):
    """`isif serve EMB` on a free loopback port, in a thread: its base URL."""
    box: dict = {}
    ready = threading.Event()

    def keep(srv, port):
        box.update(server=srv, port=port)
        ready.set()

    t = threading.Thread(target=serve, args=(ServeOptions(embed_dir=str(emb), port=0, k=6),), kwargs={"ready": keep},
                         daemon=True)
    t.start()
    assert ready.wait(60)
    try:
        yield f"http://127.0.0.1:{box['port']}"
    finally:
        box["server"].should_exit = True
        t.join(30)


@pytest.fixture
def server(run, tmp_path):  # noqa: F811
    folder = photos(tmp_path / "photos", 24)
    emb = tmp_path / "emb"
    assert main(["embed", str(run), str(folder), "--out", str(emb), "--quiet", "--workers", "0"]) == 0
    assert main(["cluster", str(emb), "--k", "3", "--per-sheet", "4"]) == 0
    with serving(emb) as base:
        yield base, folder, emb


@pytest.fixture
def map_server(run, tmp_path):  # noqa: F811
    folder = photos(tmp_path / "photos", 40)
    emb = tmp_path / "emb"
    assert main(["embed", str(run), str(folder), "--out", str(emb), "--quiet", "--workers", "0"]) == 0
    make_map(emb)
    with serving(emb) as base:
        yield base, folder, emb


def test_upload_search_click_and_clusters_in_a_real_browser(server, tmp_path):
    base, folder, emb = server
    paths = (emb / "paths.txt").read_text().split()
    driver = browser()
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(base + "/")
        wait.until(lambda d: "24 images" in d.find_element(By.ID, "info").text)
        assert not driver.find_element(By.ID, "tab-map").is_displayed()  # no `isif map` output here
        # upload a query through the file input (what a drop or the file picker does)
        query = folder / paths[5]
        driver.find_element(By.ID, "file").send_keys(str(query))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == 6)
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .result")
        assert cards[0].get_attribute("title") == paths[5]  # the uploaded copy finds itself first
        assert float(cards[0].find_element(By.CLASS_NAME, "sim").text) == pytest.approx(1.0, abs=1e-3)
        assert query.name in driver.find_element(By.ID, "query-name").text
        assert "nearest of 24 images" in driver.find_element(By.ID, "status").text
        # every thumbnail loaded (an <img> that failed has naturalWidth 0)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
        driver.save_screenshot(str(tmp_path / "serve.png"))
        # clicking a result searches again, by its id
        target = cards[2]
        tid = int(target.get_attribute("data-id"))
        target.click()
        wait.until(lambda d: d.find_element(By.ID, "query-name").text.endswith(f"(#{tid})"))
        wait.until(EC.url_contains(f"#id={tid}"))
        ids = [int(c.get_attribute("data-id")) for c in driver.find_elements(By.CSS_SELECTOR, "#results .result")]
        assert len(ids) == 6 and tid not in ids
        expected = json.loads(driver.execute_script(
            f"return fetch('/api/search?id={tid}&k=6').then(r => r.text())"))
        assert ids == [h["id"] for h in expected["results"]]
        # clusters: the tab lists them; a cluster shows its images; clicking one searches
        tab = driver.find_element(By.ID, "tab-clusters")
        assert tab.is_displayed()
        tab.click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#clusters .cluster")) == 3)
        assert not driver.find_element(By.ID, "results").is_displayed()  # one tab at a time
        assert not driver.find_element(By.ID, "query-panel").is_displayed()
        driver.find_elements(By.CSS_SELECTOR, "#clusters .cluster")[0].click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("cluster 0:"))
        members = driver.find_elements(By.CSS_SELECTOR, "#results .result")
        assert members and members[0].is_displayed()
        members[0].click()
        wait.until(lambda d: "nearest of 24 images" in d.find_element(By.ID, "status").text)
        # a bad upload shows the server's message, and the page keeps working
        bad = tmp_path / "broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        driver.find_element(By.ID, "file").send_keys(str(bad))
        wait.until(lambda d: "not a decodable image" in d.find_element(By.ID, "status").text)
        assert "error" in driver.find_element(By.ID, "status").get_attribute("class")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "/api/search" not in e["message"]]
        assert not errors, errors  # a script, style or image blocked by the page's CSP would be logged here
        assert_every_request_was_answered(driver, base)
        assert "script-src 'self'" in driver.execute_script(
            "return fetch('/').then(r => r.headers.get('content-security-policy'))")
        assert_another_site_cannot_show_the_images(driver, base)
    finally:
        driver.quit()
    assert Path(tmp_path / "serve.png").stat().st_size > 1000


def assert_every_request_was_answered(driver, base: str) -> None:
    """The page's own requests (script, style, API, thumbnails, the upload) all got 200, but the broken upload's
    400: none was refused as from another host or site."""
    seen = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => [e.name, e.initiatorType, e.responseStatus])")
    mine = [(url[len(base):], kind, status) for url, kind, status in seen if url.startswith(base)]
    kinds = {kind for _, kind, _ in mine}
    assert {"script", "link", "fetch", "img"} <= kinds, mine
    assert any(url.startswith("/api/search?k=") and kind == "fetch" and status == 200 for url, kind, status in mine)
    assert any(url.startswith("/api/search?id=") and status == 200 for url, _, status in mine)
    refused = [m for m in mine if m[2] != 200]
    assert len(refused) == 1 and refused[0][0].startswith("/api/search?k=") and refused[0][2] == 400, refused


@contextlib.contextmanager
def other_site(html: str):
    """Another website (on localhost, a different site from 127.0.0.1) serving one page, on a free loopback port."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (the name http.server calls)
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://localhost:{srv.server_address[1]}/"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(30)


def assert_another_site_cannot_show_the_images(driver, base: str,
                                               urls=("/api/thumb/0?size=64", "/api/image/0")) -> None:
    html = "".join(f'<img id="i{j}" src="{base}{u}">' for j, u in enumerate(urls))
    with other_site(html) as url:
        driver.get(url)
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(
            "return [...document.images].every(i => i.complete)"))
        loaded = driver.execute_script("return [...document.images].map(i => [i.id, i.naturalWidth])")
    assert loaded == [[f"i{j}", 0] for j in range(len(urls))], loaded  # refused: the browser said cross-site


# where the map picture lies on the screen: its top-left corner in the window and screen pixels per map pixel
MAP_RECT = """const i = document.getElementById('map-img'), r = i.getBoundingClientRect();
return [r.left, r.top, r.width / i.naturalWidth, r.height / i.naturalHeight];"""
VIEW_RECT = """const r = document.getElementById('map-view').getBoundingClientRect();
return [r.left, r.top, r.right, r.bottom];"""


def map_hash(driver) -> tuple[float, float, float] | None:
    h = driver.execute_script("return location.hash")
    return tuple(float(v) for v in h[len("#map="):].split(",")) if h.startswith("#map=") else None


def wait_for_map(driver, wait, width: int) -> None:
    wait.until(lambda d: d.execute_script(
        "const i = document.getElementById('map-img'); return i.complete && i.naturalWidth") == width)
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("PCA map of"))


def test_the_map_tab_pans_zooms_and_searches_from_a_thumbnail(map_server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    base, folder, emb = map_server
    driver = browser()
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(base + "/")
        wait.until(lambda d: "40 images" in d.find_element(By.ID, "info").text)
        g = json.loads(driver.execute_script("return fetch('/api/map').then(r => r.text())"))
        tab = driver.find_element(By.ID, "tab-map")
        assert tab.is_displayed() and not driver.find_element(By.ID, "map").is_displayed()
        tab.click()
        wait.until(lambda d: d.execute_script("return location.hash") == "#map")
        wait_for_map(driver, wait, g["width"])
        assert driver.find_element(By.ID, "map").is_displayed()
        assert not driver.find_element(By.ID, "results").is_displayed()  # one tab at a time
        # fitted: the whole picture inside the view, filling it one way
        x0, y0, s, s2 = driver.execute_script(MAP_RECT)
        vl, vt, vr, vb = driver.execute_script(VIEW_RECT)
        assert s == pytest.approx(s2)
        assert vl - 0.5 <= x0 and x0 + g["width"] * s <= vr + 0.5
        assert vt - 0.5 <= y0 and y0 + g["height"] * s <= vb + 0.5
        assert min(vr - vl - 2 - g["width"] * s, vb - vt - 2 - g["height"] * s) == pytest.approx(0, abs=1)
        fit = s

        def centre_of(j: int) -> tuple[int, int]:
            c, r, _ = g["cells"][j]
            x, y, sc, _ = driver.execute_script(MAP_RECT)
            return (round(x + (g["left"] + (c + 0.5) * g["tile"]) * sc),
                    round(y + (g["top"] + (r + 0.5) * g["tile"]) * sc))

        # zoom: the + button, then the wheel around the pointer (the map pixel under it stays put)
        driver.find_element(By.ID, "map-in").click()
        wait.until(lambda d: map_hash(d) is not None)
        assert map_hash(driver)[0] == pytest.approx(1.5 * fit, rel=1e-3)
        j = len(g["cells"]) // 2
        px, py = centre_of(j)
        x0, y0, s, _ = driver.execute_script(MAP_RECT)
        under = ((px - x0) / s, (py - y0) / s)
        ActionChains(driver).scroll_from_origin(ScrollOrigin.from_viewport(px, py), 0, -150).perform()
        wait.until(lambda d: map_hash(d)[0] > 1.5 * fit * 1.2)
        x1, y1, s1, _ = driver.execute_script(MAP_RECT)
        assert s1 > s * 1.2 and (px - x1) / s1 == pytest.approx(under[0], abs=1) and \
            (py - y1) / s1 == pytest.approx(under[1], abs=1)
        wait.until(lambda d: map_hash(d)[0] == pytest.approx(s1, rel=1e-3))
        # a drag pans by as much as the pointer moved, and is no click
        before, (z, cx, cy) = driver.execute_script(MAP_RECT), map_hash(driver)
        ActionChains(driver).move_to_element_with_offset(driver.find_element(By.ID, "map-view"), 0, 0) \
            .click_and_hold().move_by_offset(60, 30).move_by_offset(20, 10).release().perform()
        after = driver.execute_script(MAP_RECT)
        assert after[0] - before[0] == pytest.approx(80, abs=1) and after[1] - before[1] == pytest.approx(40, abs=1)
        assert after[2] == pytest.approx(before[2])
        wait.until(lambda d: map_hash(d)[1:] == pytest.approx((cx - 80 / z, cy - 40 / z), abs=0.5))
        # a reload (or the link shared) shows the same view
        view, shown = driver.execute_script("return location.hash"), driver.execute_script(MAP_RECT)
        driver.refresh()
        wait_for_map(driver, wait, g["width"])
        assert driver.execute_script("return location.hash") == view
        assert driver.execute_script(MAP_RECT) == pytest.approx(shown, abs=0.5)
        # hovering a thumbnail names it; a click on it searches with that image
        vl, vt, vr, vb = driver.execute_script(VIEW_RECT)
        visible = [k for k in range(len(g["cells"])) if vl + 10 < centre_of(k)[0] < vr - 10
                   and vt + 10 < centre_of(k)[1] < vb - 10]
        assert visible
        j = visible[len(visible) // 2]
        px, py = centre_of(j)
        act = ActionBuilder(driver)
        act.pointer_action.move_to_location(px, py)
        act.perform()
        wait.until(lambda d: d.find_element(By.ID, "map-label").is_displayed())
        assert driver.find_element(By.ID, "map-label").text == g["paths"][j]
        act = ActionBuilder(driver)
        act.pointer_action.move_to_location(px, py).click()
        act.perform()
        cid = g["cells"][j][2]
        wait.until(lambda d: d.execute_script("return location.hash") == f"#id={cid}")
        wait.until(lambda d: d.find_element(By.ID, "query-name").text.endswith(f"(#{cid})"))
        wait.until(lambda d: "nearest of 40 images" in d.find_element(By.ID, "status").text)
        paths = (emb / "paths.txt").read_text().split()
        assert driver.find_element(By.ID, "query-name").text == f"{paths[cid]} (#{cid})"
        assert len(driver.find_elements(By.CSS_SELECTOR, "#results .result")) == 6
        assert not driver.find_element(By.ID, "map").is_displayed()
        # Back returns to the map, at the same view
        driver.back()
        wait.until(lambda d: d.execute_script("return location.hash") == view)
        wait.until(lambda d: d.find_element(By.ID, "map").is_displayed())
        assert driver.execute_script(MAP_RECT) == pytest.approx(shown, abs=0.5)
        # fit goes back to #map; the Search tab leaves the map, and Back returns to it
        driver.find_element(By.ID, "map-fit").click()
        wait.until(lambda d: d.execute_script("return location.hash") == "#map")
        assert driver.execute_script(MAP_RECT)[2] == pytest.approx(fit)
        driver.find_element(By.ID, "tab-search").click()
        assert driver.find_element(By.ID, "query-panel").is_displayed() and driver.execute_script(
            "return location.hash") == ""
        driver.back()
        wait.until(lambda d: d.find_element(By.ID, "map").is_displayed())
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors  # nothing blocked by the page's Content-Security-Policy
        seen = driver.execute_script("return performance.getEntriesByType('resource').map(e => [e.name, "
                                     "e.responseStatus])")
        assert all(status == 200 for url, status in seen if url.startswith(base)), seen
        assert_another_site_cannot_show_the_images(driver, base, ("/api/map.png", f"/api/map.png?v={g['version']}"))
    finally:
        driver.quit()


@pytest.fixture
def labels_server(run, tmp_path):  # noqa: F811
    folder = photos(tmp_path / "photos", 30)
    emb = tmp_path / "emb"
    assert main(["embed", str(run), str(folder), "--out", str(emb), "--quiet", "--workers", "0"]) == 0
    assert main(["select", str(emb), "--budget", "5", "--sheet", "0"]) == 0
    paths = (emb / "paths.txt").read_text().split()
    given = tmp_path / "given.csv"
    given.write_text("path,label\n" + "".join(f"{p},{p.split('/')[0]}\n" for p in paths[::2]))
    assert main(["label", str(emb), str(given)]) == 0
    with serving(emb) as base:
        yield base, emb


def test_the_labels_tab_lists_label_next_suspects_and_one_label(labels_server, tmp_path):
    base, emb = labels_server
    ranked = [r.split(",")[1] for r in (emb / "selection.csv").read_text().split()[1:]]
    suspects = [r.split(",")[0] for r in (emb / "suspects.csv").read_text().split()[1:]]
    driver = browser()
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(base + "/")
        wait.until(lambda d: "3 labels" in d.find_element(By.ID, "info").text)
        tab = driver.find_element(By.ID, "tab-labels")
        assert tab.is_displayed()
        tab.click()
        wait.until(EC.url_contains("#labels=next"))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == 5)
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .result")
        assert [c.get_attribute("title") for c in cards] == ranked  # in pick order
        assert cards[0].find_element(By.CLASS_NAME, "labelled").text.startswith("next #1")
        driver.find_element(By.ID, "list-suspects").click()
        wait.until(EC.url_contains("#labels=suspects"))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == len(suspects))
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .result")
        assert [c.get_attribute("title") for c in cards] == suspects  # the likeliest wrong first
        assert "suspect" in cards[0].find_element(By.CLASS_NAME, "labelled").text
        from selenium.webdriver.support.ui import Select

        Select(driver.find_element(By.ID, "class-select")).select_by_index(1)
        wait.until(EC.url_contains("#labels=class-1"))
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("labelled album1"))
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .result")
        texts = [c.find_element(By.CLASS_NAME, "labelled").text.split(" · ") for c in cards]
        assert texts and all(any(p.startswith("album1 ") for p in t) for t in texts)  # "next #2 · album1 81%"
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
        driver.save_screenshot(str(tmp_path / "labels.png"))
        cards[0].click()  # a card searches, as everywhere
        wait.until(lambda d: "nearest of 30 images" in d.find_element(By.ID, "status").text)
    finally:
        driver.quit()


@pytest.fixture
def audit_server(run, tmp_path):  # noqa: F811
    import numpy as np
    from PIL import Image

    folder = photos(tmp_path / "photos", 30)
    first = sorted(folder.rglob("*.png"))[0]
    Image.fromarray((np.asarray(Image.open(first).convert("RGB")) * 0.1).astype(np.uint8)).save(folder / "dark.png")
    emb = tmp_path / "emb"
    assert main(["embed", str(run), str(folder), "--out", str(emb), "--quiet", "--workers", "0"]) == 0
    assert main(["audit", str(emb), "--k", "3", "--sheet", "0"]) == 0
    with serving(emb) as base:
        yield base, emb


def test_the_audit_tab_filters_by_issue_and_by_score(audit_server, tmp_path):
    import csv

    from selenium.webdriver.support.ui import Select

    base, emb = audit_server
    with open(emb / "audit.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    outliers = sorted(rows, key=lambda r: -float(r["outlier"]))
    driver = browser()
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(base + "/")
        tab = wait.until(lambda d: d.find_element(By.ID, "tab-audit") if d.find_element(
            By.ID, "tab-audit").is_displayed() else False)
        tab.click()
        wait.until(EC.url_contains("#audit="))
        Select(driver.find_element(By.ID, "audit-issue")).select_by_value("dark")
        wait.until(EC.url_contains("#audit=dark"))
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("dark: 1 images flagged"))
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .result")
        assert [c.get_attribute("title") for c in cards] == ["dark.png"]
        assert "dark" in cards[0].find_element(By.CLASS_NAME, "issues").text
        Select(driver.find_element(By.ID, "audit-issue")).select_by_value("outlier")
        box = driver.find_element(By.ID, "audit-min")
        score = [float(r["outlier"]) for r in outliers]
        n = next(j for j in range(5, len(score)) if score[j - 1] > score[j])  # the top n, and no more
        box.send_keys(f"{(score[n - 1] + score[n]) / 2:.6f}\n")
        wait.until(EC.url_contains("#audit=outlier@"))
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(f"outlier: {n} images with a score"))
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .result")
        assert [c.get_attribute("title") for c in cards] == [r["path"] for r in outliers[:n]]  # the worst first
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        driver.save_screenshot(str(tmp_path / "audit.png"))
    finally:
        driver.quit()

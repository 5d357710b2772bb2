"""The README's screenshot of the search page: `isif serve` over an embed folder, a query uploaded in headless
chromium, the page saved as a PNG once every thumbnail has loaded.

    python benchmarks/serve_screenshot.py EMBED_DIR QUERY_IMAGE --out docs/serve.png [--clusters-out PNG]
        [--map-out PNG [--map-zoom-steps 3]] [--colours N]

--map-out: the Map tab (the folder needs `isif map` output) once its picture has loaded, zoomed in by the + button
--map-zoom-steps times (x1.5 each) from the fitted view, the pointer over a thumbnail near the centre (its path
shown). --colours N: each PNG reduced to an adaptive palette of N colours (dithered), as the docs' screenshots are,
to keep them small (0 keeps full colour).

Needs selenium and Debian's chromium + chromium-driver (as tests/test_serve_browser.py).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("embed_dir")
    ap.add_argument("query")
    ap.add_argument("--out", default="docs/serve.png")
    ap.add_argument("--clusters-out", help="also a screenshot of the clusters tab")
    ap.add_argument("--map-out", help="also a screenshot of the map tab")
    ap.add_argument("--map-zoom-steps", type=int, default=3, help="+ clicks before the map screenshot")
    ap.add_argument("--colours", type=int, default=0, help="an adaptive palette of N colours for each PNG (0: none)")
    ap.add_argument("--k", type=int, default=14)
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=860)
    args = ap.parse_args()
    proc = subprocess.Popen([sys.executable, "-m", "isif", "serve", args.embed_dir, "--port", "0", "--k",
                             str(args.k)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    print(line.strip())
    url = line.split(" at ")[1].split()[0]
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
              f"--window-size={args.width},{args.height}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")),
                              options=opts)
    loaded = ("return [...document.querySelectorAll('img')].filter(i => i.offsetParent && "
              "i.getBoundingClientRect().top < innerHeight).every(i => i.complete && i.naturalWidth > 0)")
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(url)
        wait.until(lambda d: "images" in d.find_element(By.ID, "info").text)
        driver.find_element(By.ID, "file").send_keys(args.query)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == args.k)
        wait.until(lambda d: d.execute_script(loaded))
        save(driver, args.out, args.colours)
        if args.clusters_out:
            driver.find_element(By.ID, "tab-clusters").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#clusters .cluster"))
            wait.until(lambda d: d.execute_script(loaded))
            save(driver, args.clusters_out, args.colours)
        if args.map_out:
            map_screenshot(driver, wait, args.map_out, args.map_zoom_steps, args.colours)
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(30)


def save(driver, out: str, colours: int, note: str = "") -> None:
    driver.save_screenshot(out)
    if colours:
        from PIL import Image

        im = Image.open(out).convert("RGB")
        im.quantize(colours, Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(out, optimize=True)
    print(f"wrote {out}{note}")


def map_screenshot(driver, wait, out: str, steps: int, colours: int) -> None:
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    driver.find_element(By.ID, "tab-map").click()
    wait.until(lambda d: d.execute_script(
        "const i = document.getElementById('map-img'); return i.complete && i.naturalWidth > 0"))
    wait.until(lambda d: " map of " in d.find_element(By.ID, "status").text)
    for _ in range(steps):
        driver.find_element(By.ID, "map-in").click()
    if steps:
        wait.until(lambda d: d.execute_script("return location.hash").startswith("#map="))
    # the pointer over the thumbnail nearest the centre of the view, so that its path is shown
    g = driver.execute_script("return fetch('/api/map').then(r => r.json())")
    x0, y0, s, vx, vy = driver.execute_script(
        "const i = document.getElementById('map-img').getBoundingClientRect(), "
        "v = document.getElementById('map-view').getBoundingClientRect(); "
        "return [i.left, i.top, i.width / document.getElementById('map-img').naturalWidth, "
        "(v.left + v.right) / 2, (v.top + v.bottom) / 2]")
    centres = [(x0 + (g["left"] + (c + 0.5) * g["tile"]) * s, y0 + (g["top"] + (r + 0.5) * g["tile"]) * s)
               for c, r, _ in g["cells"]]
    px, py = min(centres, key=lambda p: (p[0] - vx) ** 2 + (p[1] - vy) ** 2)
    act = ActionBuilder(driver)
    act.pointer_action.move_to_location(round(px), round(py))
    act.perform()
    wait.until(lambda d: d.find_element(By.ID, "map-label").is_displayed())
    save(driver, out, colours, f" ({driver.execute_script('return location.hash')})")


if __name__ == "__main__":
    main()

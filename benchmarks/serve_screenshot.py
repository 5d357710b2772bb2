"""The README's screenshot of the search page: `isif serve` over an embed folder, a query uploaded in headless
chromium, the page saved as a PNG once every thumbnail has loaded.

    python benchmarks/serve_screenshot.py EMBED_DIR QUERY_IMAGE --out docs/serve.png [--clusters-out PNG]

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
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
        if args.clusters_out:
            driver.find_element(By.ID, "tab-clusters").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#clusters .cluster"))
            wait.until(lambda d: d.execute_script(loaded))
            driver.save_screenshot(args.clusters_out)
            print(f"wrote {args.clusters_out}")
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()

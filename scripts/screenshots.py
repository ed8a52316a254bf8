"""Take the README's screenshots in headless Debian Chromium (playwright): the report and the web page.

    python scripts/screenshots.py --report runs/demo/run/eval/report.html --run runs/demo/run

Writes docs/report.png and docs/page.png (small PNGs). The page is served by a real `recreason serve` on
loopback with a throwaway store.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--user", help="user to show on the page (default: the most active one)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from recreason.serving.launch import start_server

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(Path(args.report).resolve().as_uri())
        page.screenshot(path=str(ROOT / "docs" / "report.png"))
        store = Path(tempfile.mkdtemp()) / "page.db"
        proc, base = start_server(["--run", args.run, "--store", f"sqlite:///{store}"], timeout_s=300)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.goto(base + "/")
            page.wait_for_function("document.querySelectorAll('#users option').length > 0")
            user = args.user or page.eval_on_selector("#users option", "o => o.value")
            page.fill("#user", user)
            page.fill("#k", "3")
            page.click("#go")
            page.wait_for_function("document.querySelector('#status').textContent.startsWith('recommendations')",
                                   timeout=300_000)
            page.screenshot(path=str(ROOT / "docs" / "page.png"))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        browser.close()
    print("wrote docs/report.png and docs/page.png")


if __name__ == "__main__":
    main()

"""Render a report.html in headless Chromium and save a PNG screenshot (to look at, or for docs).

    python scripts/screenshot_report.py eval/a/report.html --out docs/img/report_html.png
    python scripts/screenshot_report.py eval/a/report.html --out shot.png --filter refusal

Needs a Chromium or Chrome binary (Debian: ``apt-get install chromium``). The page is opened
from disk with the network unused, so the screenshot also shows that the report is
self-contained. ``--filter`` types a query into the page's filter box first (the report's own
script does the filtering). The PNG is reduced to a 256-colour palette unless ``--full-colour``.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser(name: str | None) -> str:
    for candidate in [name] if name else BROWSERS:
        path = shutil.which(candidate)
        if path:
            return path
    sys.exit(f"screenshot_report: no browser found (tried {', '.join([name] if name else BROWSERS)});"
             " install one, e.g. apt-get install chromium, or pass --browser")


def page_with_filter(html: Path, query: str, folder: Path) -> Path:
    """A copy of the page that fills the filter box on load (the original stays untouched)."""
    import json

    script = ("<script>(function(){var b=document.getElementById('filter');"
              f"b.value={json.dumps(query)};b.dispatchEvent(new Event('input'));}})();</script>")
    copy = folder / "page.html"
    copy.write_text(html.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    return copy


def screenshot(html: Path, out: Path, *, width: int, height: int, browser: str, query: str | None,
               full_colour: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        page = page_with_filter(html, query, folder) if query else html
        raw = folder / "shot.png"
        command = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--no-first-run", "--disable-extensions", "--force-device-scale-factor=1",
            f"--user-data-dir={folder / 'profile'}", f"--window-size={width},{height}",
            f"--screenshot={raw}", page.resolve().as_uri(),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0 or not raw.is_file():
            sys.exit(f"screenshot_report: {Path(browser).name} failed (exit {done.returncode}):"
                     f" {done.stderr.strip().splitlines()[-1:] or ''}")
        data = raw.read_bytes()
    if not full_colour:
        from PIL import Image

        image = Image.open(io.BytesIO(data)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        data = buffer.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="a report.html written by `rahf eval`")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in pixels (default 1280)")
    parser.add_argument("--height", type=int, default=1800, help="viewport height: the page is cut there (default 1800)")
    parser.add_argument("--filter", dest="query", help="text to type into the report's filter box first")
    parser.add_argument("--browser", help=f"browser binary (default: the first of {', '.join(BROWSERS)} found)")
    parser.add_argument("--full-colour", action="store_true", help="keep the browser's PNG as is (larger)")
    args = parser.parse_args(argv)
    if not args.html.is_file():
        sys.exit(f"screenshot_report: {args.html}: no such file")
    screenshot(args.html, args.out, width=args.width, height=args.height, browser=find_browser(args.browser),
               query=args.query, full_colour=args.full_colour)
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KB, {args.width}x{args.height}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

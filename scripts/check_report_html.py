"""Check that an HTML cost report renders in headless Chromium: screenshot it and make sure the page is not blank.

    python scripts/check_report_html.py report.html [--screenshot out.png]
    python scripts/check_report_html.py --model ../shared/fixtures/tiny-llama [--screenshot out.png]

With `--model`, writes the report first (`llmcompress report MODEL --format html`, hardware h100-sxm, seq 64).
Exits 0 when the screenshot has enough non-white pixels and colours (text, tables and the plot drew), 1 when it
does not, 2 when Chromium is missing (Debian: `apt-get install chromium`). `tests/analysis/test_report.py` calls
`screenshot` and `check_screenshot`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
WINDOW = (1400, 2000)


def find_chromium() -> str | None:
    override = os.environ.get("CHROMIUM")
    if override:
        return override if Path(override).is_file() else None
    for path in CHROMIUM_CANDIDATES:
        if Path(path).is_file():
            return path
    return shutil.which("chromium")


def screenshot(html: Path, png: Path, chromium: str | None = None, timeout_s: float = 90) -> Path:
    """Render `html` in headless Chromium at WINDOW and write a PNG screenshot to `png`."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install chromium; or set CHROMIUM=path)")
    png = Path(png).resolve()
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmcompress-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
               Path(html).resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if not png.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return png


def check_screenshot(png: Path, min_ink: float = 0.02, min_colours: int = 16) -> dict[str, Any]:
    """Blank-page check: the share of non-white pixels and the number of distinct colours.

    A blank page is pure white (ink 0, 1 colour); the tiny-llama report's screenshot has ink about 0.1 and
    hundreds of colours (text antialiasing, the plot's markers and the share bars).
    """
    import numpy as np
    from PIL import Image

    with Image.open(png) as im:
        pixels = np.asarray(im.convert("RGB"))
    height, width = pixels.shape[:2]
    ink = float((pixels.min(axis=2) < 235).mean())
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    ok = ink >= min_ink and colours >= min_colours
    return {"ok": ok, "size": [width, height], "ink": round(ink, 4), "colours": colours}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", nargs="?", help="HTML report to check")
    parser.add_argument("--model", help="write the report of this model first (instead of giving html)")
    parser.add_argument("--screenshot", help="where to write the PNG (default: next to the HTML)")
    args = parser.parse_args(argv)
    if (args.html is None) == (args.model is None):
        parser.error("give an HTML file or --model, not both")
    if find_chromium() is None:
        print("no Chromium found (Debian: apt-get install chromium; or set CHROMIUM=path)", file=sys.stderr)
        return 2
    if args.model is not None:
        from llmcompress.cli import main as cli

        html = Path(tempfile.mkdtemp(prefix="llmcompress-report-")) / "report.html"
        rc = cli(["report", args.model, "--format", "html", "--hardware", "h100-sxm", "--seq", "64", "-o", str(html)])
        if rc:
            return rc
    else:
        html = Path(args.html)
        if not html.is_file():
            parser.error(f"no such file: {html}")
    png = Path(args.screenshot) if args.screenshot else html.with_suffix(".png")
    result = check_screenshot(screenshot(html, png))
    print(f"{'ok' if result['ok'] else 'BLANK'}: {png} {result['size'][0]}x{result['size'][1]}, "
          f"ink {result['ink']:.3f}, {result['colours']} colours")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""A report page as a PNG, as a user's browser shows it: ``python -m benchmarks.report_screenshot PAGE PNG
[--width PX] [--height PX]``.

Rendered by headless Chromium (Debian's ``chromium`` package, ``/usr/bin/chromium``; not a Python
dependency, so not in the lock: the benchmarks that take screenshots say when it is missing). The page is
shown at ``width`` x ``height`` CSS pixels from its top, as a window of that size would show it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSER = "chromium"
# headless, offline: no sandbox (run as root here), no GPU, none of the browser's own network traffic
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def browser() -> str | None:
    """The Chromium executable on the PATH, or ``None``."""
    return shutil.which(BROWSER)


def screenshot(page: Path, png: Path, *, width: int = 1280, height: int = 2400) -> Path:
    """Render the HTML file ``page`` into ``png`` (created, with its folder); raises ``RuntimeError`` when
    Chromium is missing or writes no image."""
    executable = browser()
    if executable is None:
        raise RuntimeError(f"no {BROWSER} on the PATH (Debian: apt-get install chromium)")
    png = Path(png).absolute()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="rwcflow-chromium-") as profile:
        done = subprocess.run([executable, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                               f"--screenshot={png}", Path(page).absolute().as_uri()],
                              capture_output=True, text=True, timeout=120)
    if not png.exists():
        raise RuntimeError(f"{BROWSER} wrote no screenshot of {page} (exit {done.returncode}): {done.stderr[-500:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path, help="HTML file")
    parser.add_argument("png", type=Path, help="PNG file to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args(argv)
    try:
        print(screenshot(args.page, args.png, width=args.width, height=args.height))
    except RuntimeError as exc:
        print(f"report_screenshot: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

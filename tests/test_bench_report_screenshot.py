"""benchmarks.report_screenshot: a page rendered by headless Chromium into a PNG of the window's size."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from benchmarks import report_screenshot


@pytest.mark.skipif(report_screenshot.browser() is None, reason="Chromium is not installed (apt-get install chromium)")
def test_a_page_becomes_a_png_of_the_window_size_showing_its_colours(tmp_path):
    page = tmp_path / "page.html"
    page.write_text('<html><body style="margin:0"><div style="background:#ff0000;width:100px;height:50px">'
                    '</div></body></html>')
    png = report_screenshot.screenshot(page, tmp_path / "shots" / "page.png", width=320, height=200)
    pixels = np.round(255 * imread(png)[..., :3]).astype(int)  # RGB(A) in [0, 1]
    assert pixels.shape == (200, 320, 3)
    assert pixels[25, 50].tolist() == [255, 0, 0]  # inside the div
    assert pixels[150, 250].tolist() == [255, 255, 255]  # the page's white background


def test_without_chromium_it_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no browser on this PATH
    page = tmp_path / "page.html"
    page.write_text("<html></html>")
    assert report_screenshot.main([str(page), str(tmp_path / "page.png")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "report_screenshot: no chromium on the PATH (Debian: apt-get install chromium)"
    assert not (tmp_path / "page.png").exists()

"""report.html as a reader sees it, in a real headless Chromium driven by Playwright.

Nothing here parses the HTML: every check reads the rendered page (the DOM after layout, the
decoded chart image, the pixels of a screenshot). The browser is Debian's `chromium` package
(`.ci/run` installs it when missing); Playwright's own browser download is never used. Without a
chromium binary the tests skip, saying so.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from helpers import crafted_report

from pipeline.report import write_report
from pipeline.report.render import render_html

CHROMIUM = Path("/usr/bin/chromium")
# Quiet, offline, no first-run work: the page is a local file with its chart as a data URI.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VARIANTS = ("fp32", "int8")  # helpers.crafted_report
RELEASED = "int8"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"no {CHROMIUM} on this machine (.ci/run installs Debian's chromium package)",
)


@pytest.fixture(scope="module")
def browser():
    # A missing playwright is an error, not a skip: it is in the dev extra that `make test` installs.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser: Any, html: Path) -> Any:
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(html.as_uri(), wait_until="load", timeout=30_000)
    return page


def chart_state(page: Any) -> dict[str, Any]:
    """What the browser made of the chart <img>: loaded, decoded size, size on screen."""
    return page.eval_on_selector(
        "img#chart",
        "img => ({complete: img.complete, naturalWidth: img.naturalWidth,"
        " naturalHeight: img.naturalHeight, width: img.clientWidth, height: img.clientHeight})",
    )


def distinct_colours(png: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24)
    return len(colours or [])


def test_reader_sees_chart_every_variant_and_release(browser, tmp_path):
    paths = write_report(crafted_report(), tmp_path)
    page = open_page(browser, paths["html"])
    try:
        chart = chart_state(page)
        assert chart["complete"] and chart["naturalWidth"] > 0 and chart["naturalHeight"] > 0, chart
        assert chart["width"] > 100 and chart["height"] > 100, chart  # laid out, not collapsed
        shot = page.locator("img#chart").screenshot()
        assert distinct_colours(shot) > 8, "the chart renders as (nearly) one colour"

        table = page.locator("table#summary")
        assert table.is_visible()
        first_cells = table.locator("tbody tr td:first-child").all_inner_texts()
        assert first_cells[0] == "PyTorch eager fp32 (baseline)"
        for name in VARIANTS:
            label = f"{name} (released)" if name == RELEASED else name
            assert label in first_cells, f"{label!r} missing from the rendered summary: {first_cells}"
        assert len(first_cells) == 1 + len(VARIANTS)

        release = page.locator("#release")
        assert release.is_visible()
        assert release.inner_text().startswith(f"Release: {RELEASED} - fastest within all gates")
    finally:
        page.close()


def test_blank_or_broken_chart_is_caught(browser, tmp_path):
    """The checks above can fail: a one-colour chart and an undecodable one are both told apart."""
    from PIL import Image

    report = crafted_report()
    blank = io.BytesIO()
    Image.new("RGB", (640, 480), "white").save(blank, format="PNG")
    cases = {"blank": blank.getvalue(), "broken": b"\x89PNG\r\n\x1a\nnot really a png"}
    for name, png in cases.items():
        html = tmp_path / f"{name}.html"
        html.write_text(render_html(report, png), encoding="utf-8")
        page = open_page(browser, html)
        try:
            chart = chart_state(page)
            if name == "blank":
                assert chart["naturalWidth"] == 640
                assert distinct_colours(page.locator("img#chart").screenshot()) == 1
            else:
                assert chart["naturalWidth"] == 0, chart
        finally:
            page.close()

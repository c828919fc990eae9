"""tests/browser.py itself, on small pages written here: images and the screenshot, blocked network, errors."""

from __future__ import annotations

import os
import pathlib

import pytest
from PIL import Image

from tests import browser
from tests.browser import browser_unavailable, check_page

REMOTE = "https://example.invalid"


@pytest.fixture
def chromium() -> None:
    reason = browser_unavailable()
    if reason:
        pytest.skip(reason)


def write_page(tmp_path: pathlib.Path, body: str, head: str = "", title: str = "test page") -> pathlib.Path:
    page = tmp_path / "page.html"
    page.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>{head}</head>"
        f"<body>{body}</body></html>",
        encoding="utf-8",
    )
    return page


def test_reason_without_chromium(monkeypatch):
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    reason = browser_unavailable.__wrapped__()
    assert reason is not None and "chromium" in reason and "\n" not in reason


def test_reason_when_chromium_cannot_start(monkeypatch, tmp_path):
    pytest.importorskip("playwright.sync_api")
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\necho 'no display for this one' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    reason = browser_unavailable.__wrapped__()
    assert reason is not None and reason.startswith("chromium fails to launch:") and "\n" not in reason
    assert "no display for this one" in reason and "exitCode=3" in reason


def test_local_images_and_full_page_screenshot(chromium, tmp_path):
    Image.new("RGB", (7, 5), (200, 30, 30)).save(tmp_path / "ok.png")
    body = (
        "<img id=a src='ok.png'><img id=b src='missing.png'>"
        "<div style='height: 2000px; background: rgb(0, 0, 255)'>tall</div>"
    )
    shot = tmp_path / "shots" / "page.png"
    check = check_page(write_page(tmp_path, body, title="two images"), shot)
    assert check.title == "two images"
    assert check.url.startswith("file://")
    assert [img.src for img in check.images] == ["ok.png", "missing.png"]
    ok, missing = check.images
    assert (ok.natural_width, ok.natural_height) == (7, 5)
    assert ok.url == (tmp_path / "ok.png").resolve().as_uri()
    assert (missing.natural_width, missing.natural_height) == (0, 0)
    assert any("ERR_FILE_NOT_FOUND" in msg and "missing.png" in msg for msg in check.console_errors)
    assert check.network_requests == []
    assert check.page_errors == []

    assert check.screenshot_path == shot and shot.is_file()
    with Image.open(shot) as im:
        assert im.format == "PNG"
        im.load()
        assert im.width == browser.VIEWPORT["width"]
        assert im.height >= 2000  # the whole page, not just the viewport
        r, g, b = im.convert("RGB").getpixel((im.width // 2, 1500))
        assert b > 200 and r < 50 and g < 50


def test_remote_references_recorded_and_blocked(chromium, tmp_path):
    head = (
        f"<style>@font-face {{ font-family: Remote; src: url('{REMOTE}/font.woff2') format('woff2'); }}"
        " p { font-family: Remote, sans-serif; }</style>"
        f"<script src='{REMOTE}/lib.js' onerror=\"document.title = 'script blocked'\"></script>"
    )
    body = (
        f"<p>text in a remote font</p><img src='{REMOTE}/pic.png'>"
        f"<script>new WebSocket('wss://example.invalid/socket');</script>"
    )
    check = check_page(write_page(tmp_path, body, head=head), tmp_path / "shot.png")
    wanted = {f"{REMOTE}/lib.js", f"{REMOTE}/pic.png", f"{REMOTE}/font.woff2", "wss://example.invalid/socket"}
    assert wanted <= set(check.network_requests)
    assert all("://example.invalid/" in url for url in check.network_requests)
    assert check.title == "script blocked"  # the script never loaded
    (img,) = check.images
    assert img.natural_width == 0  # nor did the image
    assert any("ERR_BLOCKED_BY_CLIENT" in msg for msg in check.console_errors)


def test_script_errors_recorded(chromium, tmp_path):
    body = "<script>console.error('logged on purpose');</script><script>throw new TypeError('boom from the page');</script>"
    check = check_page(write_page(tmp_path, body), tmp_path / "shot.png")
    assert len(check.page_errors) == 1 and "boom from the page" in check.page_errors[0]
    assert check.page_errors[0].startswith("TypeError")
    assert any(msg.startswith("logged on purpose (file://") for msg in check.console_errors)
    assert check.network_requests == []

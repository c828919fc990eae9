"""Open a page the project writes (an HTML file on disk) in headless Chromium and report what a person would see.

Not a test module: a helper for tests. It drives Debian's ``chromium`` (``scripts/setup_browser.sh`` installs it)
through playwright, never playwright's own browser download. Every request that would leave the machine (any
scheme but ``file:`` and ``data:``) is recorded and aborted, and Chromium resolves no host names at all.

    reason = browser_unavailable()
    if reason:
        pytest.skip(reason)
    check = check_page(report_html, tmp_path / "report.png")
    assert not check.network_requests and not check.page_errors
    assert all(img.natural_width > 0 for img in check.images)
"""
from __future__ import annotations

import functools
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Union

CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Nothing resolves: even a preconnect or prefetch that playwright's routing does not see cannot go out.
    "--host-resolver-rules=MAP * ~NOTFOUND",
)
LOCAL_SCHEMES = ("file:", "data:")
VIEWPORT = {"width": 1280, "height": 800}


@dataclass(frozen=True)
class ImageInfo:
    src: str  # the src attribute as the page wrote it ("" when absent)
    url: str  # what it resolved to (img.currentSrc or img.src)
    natural_width: int  # 0 when the image did not load
    natural_height: int


@dataclass(frozen=True)
class PageCheck:
    url: str  # the file:// URL that was opened
    title: str
    images: List[ImageInfo]  # every <img> in document order, after load and once each one is complete
    network_requests: List[str]  # URLs of every non-file:, non-data: request (all of them were blocked)
    console_errors: List[str]  # every console message of type "error", as "text (source-url:line)"
    page_errors: List[str]  # every uncaught exception, as "Name: message"
    screenshot_path: Path  # the full-page PNG that was saved


def _is_local(url: str) -> bool:
    return url.startswith(LOCAL_SCHEMES)


def _one_line(exc: BaseException) -> str:
    """The error's first line, plus (for a browser that died) the last line it wrote to stderr and its exit."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    parts = [lines[0]]
    err = re.compile(r"^(?:- )?\[pid=\d+\]\[err\]\s*")
    stderr = [err.sub("", line) for line in lines if err.match(line)]
    if stderr:
        parts.append(f"chromium said: {stderr[-1]}")
    exits = [m.group(1) for m in map(re.compile(r"process did exit: (exitCode=\S+ signal=\S+)").search, lines) if m]
    if exits:
        parts.append(exits[-1].rstrip(">"))
    return " | ".join(parts)[:400]


def _launch(playwright: Any, user_data_dir: str) -> Any:
    """A persistent context (the only way to give Chromium its own --user-data-dir through playwright)."""
    return playwright.chromium.launch_persistent_context(
        user_data_dir,
        executable_path=shutil.which("chromium"),
        headless=True,
        args=list(CHROMIUM_ARGS),
        viewport=VIEWPORT,
        service_workers="block",
    )


@functools.lru_cache(maxsize=1)
def browser_unavailable() -> Optional[str]:
    """Why a browser test must skip here (one line), or None when headless Chromium runs. Checked once."""
    if shutil.which("chromium") is None:
        return "no chromium on PATH (scripts/setup_browser.sh installs Debian's chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        return f"playwright is not importable: {_one_line(exc)}"
    try:
        with tempfile.TemporaryDirectory(prefix="lpips-pipe-chromium-", ignore_cleanup_errors=True) as profile:
            with sync_playwright() as p:
                context = _launch(p, profile)
                context.close()
    except Exception as exc:  # playwright raises its own Error; anything else means the same here
        return f"chromium fails to launch: {_one_line(exc)}"
    return None


def check_page(
    html_path: Union[str, Path], screenshot_path: Union[str, Path], timeout_s: float = 30.0
) -> PageCheck:
    """Open ``html_path`` (a local file) in headless Chromium, wait for the load event, for every image to
    complete and for its fonts, save a full-page screenshot to ``screenshot_path`` and return what the page did."""
    from playwright.sync_api import sync_playwright

    html = Path(html_path).resolve()
    if not html.is_file():
        raise FileNotFoundError(html)
    shot = Path(screenshot_path)
    shot.parent.mkdir(parents=True, exist_ok=True)
    url = html.as_uri()
    timeout_ms = timeout_s * 1000.0
    network: List[str] = []
    console_errors: List[str] = []
    page_errors: List[str] = []

    def on_request(request: Any) -> None:
        if not _is_local(request.url):
            network.append(request.url)

    def on_console(message: Any) -> None:
        if message.type == "error":
            where = message.location or {}
            at = f" ({where['url']}:{where.get('lineNumber', 0)})" if where.get("url") else ""
            console_errors.append(f"{message.text}{at}")

    def on_page_error(error: Any) -> None:
        page_errors.append(f"{error.name}: {error.message}" if getattr(error, "name", "") else str(error))

    def route(r: Any) -> None:  # let file: and data: through, abort everything else
        if _is_local(r.request.url):
            r.continue_()
        else:
            r.abort("blockedbyclient")

    def route_websocket(ws: Any) -> None:  # never connected to a server: recorded and closed
        network.append(ws.url)
        ws.close()

    with tempfile.TemporaryDirectory(prefix="lpips-pipe-chromium-", ignore_cleanup_errors=True) as profile:
        with sync_playwright() as p:
            context = _launch(p, profile)
            try:
                context.set_default_timeout(timeout_ms)
                context.route("**/*", route)
                context.route_web_socket("**/*", route_websocket)
                context.on("request", on_request)
                page = context.pages[0] if context.pages else context.new_page()
                page.on("console", on_console)
                page.on("pageerror", on_page_error)
                page.goto(url, wait_until="load", timeout=timeout_ms)
                page.wait_for_function(
                    "() => Array.from(document.images).every((img) => img.complete)", timeout=timeout_ms
                )
                page.evaluate("() => document.fonts.ready.then(() => true)")
                raw = page.evaluate(
                    """() => Array.from(document.images).map((img) => ({
                        src: img.getAttribute("src") || "",
                        url: img.currentSrc || img.src || "",
                        w: img.naturalWidth,
                        h: img.naturalHeight,
                    }))"""
                )
                title = page.title()
                page.screenshot(path=str(shot), full_page=True, timeout=timeout_ms)
            finally:
                context.close()
    images = [ImageInfo(r["src"], r["url"], int(r["w"]), int(r["h"])) for r in raw]
    return PageCheck(url, title, images, network, console_errors, page_errors, shot)

"""What the web page's browser tests share: a `glmkit web` process, Debian's chromium driven by Playwright (never
a downloaded browser), and small steps on the page (send, wait for the answer, click a message's button).
Screenshots go to $GLMKIT_TEST_ARTIFACTS (default: test-artifacts/ in the repository) for a person to look at.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("GLMKIT_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))
PAGE_S = 60    # a page load or an answer on a loaded 2-core machine (ms below)


def metric(url: str, name: str, key: str | None = None) -> float:
    """A glmkit_<name> value from a server's /metrics (0 when absent)."""
    import re

    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    match = re.search(rf"^glmkit_{re.escape(name)} (\S+)$", httpx.get(url + "/metrics", headers=headers).text, re.M)
    return float(match.group(1)) if match else 0.0


def need_browser():
    pytest.importorskip("gradio")
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium (apt-get install chromium)")
    return playwright


class WebProcess:
    """`glmkit web --url URL` on a free port, with its own conversation store."""

    def __init__(self, url: str, store: Path, *flags: str, api_key: str | None = None):
        from server_fixtures import free_port

        self.port = free_port()
        self.address = f"http://127.0.0.1:{self.port}/"
        self.log = open(store.with_suffix(".log"), "ab")
        cmd = [sys.executable, "-m", "glmkit.cli", "web", "--url", url, "--port", str(self.port),
               "--conversations", str(store), "--language", "zh", *flags]
        if api_key:
            cmd += ["--api-key", api_key]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + PAGE_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, Path(self.log.name).read_text(errors="replace")
            try:
                if httpx.get(self.address, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"glmkit web did not answer in {PAGE_S} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def open_page(browser, address: str, *, login: tuple[str, str] | None = None, new: bool = True):
    """A new browser context on the page, logged in if asked; with `new` on a new conversation (the page
    opens the most recent one)."""
    context = browser.new_context(viewport={"width": 1400, "height": 950}, locale="en-US")  # Gradio's own labels
    page = context.new_page()
    page.set_default_timeout(PAGE_S * 1000)
    page.goto(address)
    if login is not None:
        page.fill("input[type=text]", login[0])
        page.fill("input[type=password]", login[1])
        page.keyboard.press("Enter")
    page.wait_for_selector("#message textarea")
    page.wait_for_function("document.querySelector('#model input') && document.querySelector('#model input').value")
    if new:
        page.click("#new")
        page.wait_for_function("() => !document.querySelector('#chat [data-testid=\"user\"]')")
    return page


def login_refused(browser, address: str, key: str) -> bool:
    """Whether the page's login turns this key away (the chat never appears)."""
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(address)
        page.fill("input[type=text]", "someone")
        page.fill("input[type=password]", key)
        page.keyboard.press("Enter")
        page.wait_for_timeout(1500)
        return page.locator("#message").count() == 0
    finally:
        context.close()


def send(page, text: str) -> None:
    page.fill("#message textarea", text)
    page.press("#message textarea", "Enter")


def bot_texts(page) -> list[str]:
    return [t.strip() for t in page.locator('#chat [data-testid="bot"]').all_inner_texts()]


def user_texts(page) -> list[str]:
    return [t.strip() for t in page.locator('#chat [data-testid="user"]').all_inner_texts()]


def wait_for_answer(page, expected: str) -> None:
    """Until a bot message holds `expected` and the answer has ended (the stats line is written then)."""
    page.wait_for_function("([sel, text]) => [...document.querySelectorAll(sel)].some(e => e.innerText.includes(text))",
                           arg=['#chat [data-testid="bot"]', expected])
    page.wait_for_function("() => !document.querySelector('#chat .generating, #chat .pending') && "
                           "document.querySelector('#stats').innerText.includes('tokens')")


def wait_for_stats(page, log: str = "") -> str:
    """Until the answer has ended (the stats line shows its speed, or an error); the stats line. A timeout
    fails with what the page shows and the end of the server's log (`log`: its path), not a bare timeout."""
    ended = "() => /tokens\\/s|error/.test(document.querySelector('#stats').innerText)"
    try:
        page.wait_for_function(ended)
    except Exception as timeout:  # playwright's TimeoutError
        tail = Path(log).read_text(errors="replace")[-3000:] if log else ""
        shot(page, "timeout")
        raise AssertionError(f"the answer did not end: stats {page.inner_text('#stats')!r}, user {user_texts(page)}, "
                             f"bot {bot_texts(page)}\n{tail}") from timeout
    return page.inner_text("#stats")


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"web-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def choose_mode(page, mode: str) -> None:
    """Click a mode by its value (labels depend on the language)."""
    from glmkit.ui.web.app import MODES

    page.locator("#mode label").nth(MODES.index(mode)).click()

"""The web page over the real default model (`glmkit serve` with the page at /ui), in a real browser (slow):
Stop ends an answer mid-way and the server counts the request aborted with its KV blocks freed; in the Code
Interpreter mode a plot request comes back as an image the model's own code drew.
"""

from __future__ import annotations

import time

import pytest

from server_fixtures import ServerProcess
from web_support import bot_texts, choose_mode, metric, need_browser, open_page, send, shot

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    need_browser()
    process = ServerProcess("--embedding-model", "none", ui=True,
                            env={"GLMKIT_HOME": str(tmp_path_factory.mktemp("glmkit-home"))})
    yield process
    process.stop()






def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_stop_aborts_the_answer_on_the_server(server, browser):
    page = open_page(browser, server.url + "/ui/")
    set_number(page, "temperature", 0)
    set_number(page, "max-tokens", 600)
    aborted = metric(server.url, "requests_aborted_total")
    send(page, "Write a very long story about a dragon who learns to paint.")
    page.wait_for_function("() => document.querySelector('#chat [data-testid=\"bot\"]')?.innerText.length > 40")
    page.click("#stop")
    page.wait_for_function("() => document.querySelector('#stats').innerText.includes('stopped')")
    shown = bot_texts(page)[-1]
    deadline = time.monotonic() + 20
    while metric(server.url, "requests_aborted_total") == aborted and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(server.url, "requests_aborted_total") == aborted + 1
    assert metric(server.url, "kv_blocks_used") == 0
    page.wait_for_timeout(1000)
    assert bot_texts(page)[-1] == shown  # nothing more arrived
    shot(page, "default-stopped")
    page.context.close()


def test_code_interpreter_plot_by_the_default_model(server, browser):
    page = open_page(browser, server.url + "/ui/")
    set_number(page, "temperature", 0)
    set_number(page, "max-tokens", 160)  # the call, then a short answer
    choose_mode(page, "code")
    # The 0.5B model, asked in words, calls python with code that forgets to define x; given the code, it runs it
    send(page, "Run this code with the python tool: import numpy as np; import matplotlib.pyplot as plt; "
               "x = np.linspace(0, 10, 50); plt.plot(x, x ** 2); plt.title('y = x^2'); plt.show()")
    page.wait_for_function("() => document.querySelector('#stats').innerText.includes('tokens/s')",
                           timeout=240_000)
    shot(page, "default-code-interpreter")
    image = page.locator("#chat img").first
    assert image.count(), page.inner_text("#chat")
    assert image.evaluate("img => img.naturalWidth") >= 200
    page.context.close()

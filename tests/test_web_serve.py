"""The web page as `glmkit serve` mounts it at /ui, in a real browser, over a tiny model: the page asks for an
API key at login while the API keeps refusing requests without one, its answers go through the server's API
(the server counts them), and `--language en` labels the page in English. Stop against a real server, and the
real default model's plot, are in test_web_default.py (slow).
"""

from __future__ import annotations

import httpx
import pytest

from adapter_fixtures import make_adapter
from server_fixtures import ServerProcess
from web_support import login_refused, metric, need_browser, open_page, send, shot, wait_for_stats

KEY = "sk-web-test"
QUESTION = "晚上睡不着应该怎么办"


@pytest.fixture(scope="module")
def server(glm_dir, tmp_path_factory):
    need_browser()
    home = tmp_path_factory.mktemp("glmkit-home")
    adapter = make_adapter(glm_dir, tmp_path_factory.mktemp("web-adapter") / "tuned", ["all-linear"], 4, seed=1)
    process = ServerProcess("--model", str(glm_dir), "--api-key", KEY, "--language", "en", "--threads", "1",
                            "--kv-cache-memory", "0.02", "--embedding-model", "none", "--adapter", f"tuned={adapter}",
                            ui=True, env={"GLMKIT_HOME": str(home)})
    yield process
    process.stop()


def test_the_page_asks_for_a_key_and_the_api_still_needs_one(server):
    assert httpx.get(server.url + "/v1/models").status_code == 401
    page = httpx.get(server.url + "/ui/")
    assert page.status_code == 200 and "gradio" in page.text.lower()


# Under CI load the page has twice shown the user's message and never the answer, although the server had streamed
# it in full (the access log shows the request ending 200 with its tokens, no abort): a race in the page not yet
# found (it did not reproduce alone, nor in 3 runs under full CPU load). One rerun, so that it cannot hide a page
# that never answers; the failure's message keeps the page, the server log's tail and a screenshot.
PAGE_RACE = pytest.mark.flaky(reruns=1, reruns_delay=2)


@PAGE_RACE
def test_the_mounted_page_answers_through_the_api_with_the_users_key(server, browser):
    page = open_page(browser, server.url + "/ui/", login=("ann", KEY))
    assert page.inner_text("#new").strip() == "New conversation"  # --language en
    finished = metric(server.url, "requests_finished_total", KEY)
    send(page, QUESTION)
    page.wait_for_function("() => document.querySelector('#chat [data-testid=\"user\"]')")
    assert "tokens/s" in wait_for_stats(page, server.log_path)
    assert metric(server.url, "requests_finished_total", KEY) == finished + 1
    assert metric(server.url, "kv_blocks_used", KEY) == 0
    assert page.locator('#chat [data-testid="bot"]').count() == 1
    shot(page, "serve-english")
    page.context.close()


@PAGE_RACE
def test_the_model_picker_reaches_a_served_adapter(server, browser):
    page = open_page(browser, server.url + "/ui/", login=("ann", KEY))
    page.click("#model input")
    page.click('#model [role="option"][aria-label="tuned"]')  # the adapter is listed beside the model's names
    assert page.input_value("#model input") == "tuned"
    used = lambda: metric(server.url, 'model_requests_total{model="tuned"}', KEY)  # noqa: E731
    before = used()
    send(page, QUESTION)
    assert "tokens/s" in wait_for_stats(page, server.log_path)
    assert used() == before + 1  # the answer came through the adapter
    shot(page, "serve-adapter")
    page.context.close()


def test_a_wrong_key_is_refused_at_login(server, browser):
    assert login_refused(browser, server.url + "/ui/", "not-the-key")

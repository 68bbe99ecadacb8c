"""The web page in a real headless browser (Debian's chromium, driven by Playwright), against a scripted
OpenAI-compatible server (tests/scripted_server.py) whose answers depend on the user's words, so every test
knows what it must see: streaming, Stop (the server sees the stream dropped), retry, edit, undo, the Code
Interpreter's plot, Character mode's greeting and persona, conversations kept across a restart of the page,
and two users with their own keys who see only their own conversations and kernels. Each mode's screenshot is
saved (web_support.ARTIFACTS). The page against a real `glmkit serve` is in test_web_serve.py.
"""

from __future__ import annotations

import json

import pytest

from scripted_server import ScriptedServer
from web_support import (WebProcess, bot_texts, choose_mode, login_refused, open_page, send, shot, user_texts,
                         wait_for_answer)

PLOT = ("import matplotlib.pyplot as plt\nplt.figure(figsize=(4, 3))\nplt.plot([1, 2, 3], [1, 4, 9])\n"
        "plt.title('平方')\nplt.show()")
SLOW = "很长很长的回答。" * 300


class Answers:
    """The scripted model: its reply follows the last user message (and counts its answers)."""

    def __init__(self):
        self.count = 0

    def __call__(self, body: dict):
        messages = body["messages"]
        last = messages[-1]
        user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        if last["role"] == "tool":
            return "text", f"运行结果：{last['content'].strip()[:60]}", "stop", 9
        if body.get("tools") and user.startswith("画"):
            return "call", "python", {"code": PLOT}
        if body.get("tools") and user.startswith("算 "):
            return "call", "calculator", {"expression": user[2:]}
        if body.get("tools") and user.startswith("运行 "):
            return "call", "python", {"code": user[3:]}
        if user.startswith("慢"):
            return "text", SLOW, "stop", 900, 0.05
        self.count += 1
        return "text", f"回答 #{self.count}：{user}", "stop", 7




@pytest.fixture(scope="module")
def model():
    server = ScriptedServer(Answers(), piece_chars=2)
    yield server
    server.close()


@pytest.fixture(scope="module")
def web(model, tmp_path_factory):
    store = tmp_path_factory.mktemp("web") / "web.sqlite3"
    process = WebProcess(model.url, store)
    yield process
    process.stop()


@pytest.fixture
def page(browser, web):
    page = open_page(browser, web.address)
    yield page
    page.context.close()


def test_a_message_streams_in_with_its_figures(page, model):
    send(page, "你好")
    wait_for_answer(page, "：你好")
    assert user_texts(page) == ["你好"] and bot_texts(page)[-1].startswith("回答 #")
    stats = page.inner_text("#stats")
    assert "7 tokens" in stats and "tokens/s" in stats
    assert model.requests[-1]["messages"][-1] == {"role": "user", "content": "你好"}
    assert model.requests[-1]["stream"] is True and "tools" not in model.requests[-1]
    shot(page, "chat")


def test_stop_ends_the_answer_and_the_server_sees_it_dropped(page, model):
    aborted = model.aborted
    send(page, "慢慢讲")
    page.wait_for_function("() => document.querySelector('#chat [data-testid=\"bot\"]')?.innerText.length > 20")
    page.click("#stop")
    page.wait_for_function("() => document.querySelector('#stats').innerText.includes('stopped')")
    shown = bot_texts(page)[-1]
    assert 0 < len(shown) < len(SLOW)
    page.wait_for_timeout(1500)
    assert bot_texts(page)[-1] == shown  # nothing more arrives
    deadline = 50
    while model.aborted == aborted and deadline:
        page.wait_for_timeout(100)
        deadline -= 1
    assert model.aborted == aborted + 1


def test_retry_asks_again_and_replaces_the_answer(page, model):
    send(page, "再说一遍")
    wait_for_answer(page, "：再说一遍")
    first = bot_texts(page)[-1]
    page.locator('#chat button[aria-label="Retry"]').last.click()
    page.wait_for_function("(old) => { const b = [...document.querySelectorAll('#chat [data-testid=\"bot\"]')];"
                           " return b.length && b[b.length - 1].innerText.trim() !== old && "
                           "b[b.length - 1].innerText.includes('：再说一遍'); }", arg=first)
    assert user_texts(page) == ["再说一遍"] and len(bot_texts(page)) == 1
    assert model.requests[-1]["messages"] == [{"role": "user", "content": "再说一遍"}]


def test_edit_an_earlier_message_continues_from_there(page, model):
    send(page, "第一问")
    wait_for_answer(page, "：第一问")
    send(page, "第二问")
    wait_for_answer(page, "：第二问")
    page.locator('#chat button[aria-label="Edit"]').first.click()
    editor = page.locator("#chat textarea").first
    editor.fill("改过的第一问")
    page.locator('#chat button[aria-label="Submit"]').first.click()
    wait_for_answer(page, "：改过的第一问")
    assert user_texts(page) == ["改过的第一问"]
    assert model.requests[-1]["messages"] == [{"role": "user", "content": "改过的第一问"}]


def test_undo_puts_the_message_back_in_the_box(page):
    send(page, "撤回这句")
    wait_for_answer(page, "：撤回这句")
    page.locator('#chat button[aria-label="Undo"]').last.click()
    page.wait_for_function("() => document.querySelector('#message textarea').value === '撤回这句'")
    assert user_texts(page) == [] and bot_texts(page) == []


def test_code_interpreter_shows_the_plot(page, model):
    choose_mode(page, "code")
    send(page, "画一张平方的图")
    wait_for_answer(page, "运行结果")
    image = page.locator("#chat img").first
    image.wait_for()
    assert image.evaluate("img => img.naturalWidth") >= 200
    sent = model.requests[-1]
    assert [t["function"]["name"] for t in sent["tools"]] == ["python"]
    assert "[image 1 shown to the user" in sent["messages"][-1]["content"]
    page.wait_for_timeout(700)  # the answer's last update (the sidebar) re-renders the steps closed
    page.locator("#chat").get_by_text("⚙ python").first.click()  # the step opens: code and observation
    page.get_by_text("plt.title").first.wait_for()
    shot(page, "code-interpreter")


def test_tools_mode_shows_each_call_as_a_step(page, model):
    choose_mode(page, "tools")
    send(page, "算 123456 * 654321")
    wait_for_answer(page, "运行结果：80779853376")
    offered = {t["function"]["name"] for t in model.requests[-1]["tools"]}
    assert {"calculator", "current_time", "random_number"} <= offered and "python" not in offered
    page.wait_for_timeout(700)  # the answer's last update (the sidebar) re-renders the steps closed
    page.locator("#chat").get_by_text("⚙ calculator").first.click()
    page.get_by_text('"expression": "123456 * 654321"').first.wait_for()
    shot(page, "tools")


def test_rename_export_and_delete_a_conversation(page):
    send(page, "要改名的对话")
    wait_for_answer(page, "：要改名的对话")
    page.fill("#title textarea", "我的笔记")
    page.click("#rename")
    page.wait_for_function("() => document.querySelector('#conversations').innerText.includes('我的笔记')")
    page.click("#export-md")
    link = page.locator("#exported a").first
    link.wait_for()
    assert "conversation.md" in page.inner_text("#exported").replace("\n", "")
    with page.expect_download() as download:
        link.click()
    text = open(download.value.path(), encoding="utf-8").read()
    assert text.startswith("# 我的笔记") and "要改名的对话" in text
    page.click("#delete")
    page.wait_for_function("() => !document.querySelector('#conversations').innerText.includes('我的笔记')")
    assert user_texts(page) == []


def test_character_mode_greets_and_keeps_the_persona(page, model):
    choose_mode(page, "character")
    page.fill("#bot-name textarea", "苏梦远")
    page.fill("#bot-info textarea", "一位温柔的古琴老师")
    page.fill("#user-name textarea", "小林")
    page.fill("#greeting textarea", "你好，我是苏梦远。今天想学哪首曲子？")
    send(page, "想学《流水》")
    wait_for_answer(page, "：想学《流水》")
    assert bot_texts(page)[0].startswith("你好，我是苏梦远")
    send(page, "先从哪里开始")
    wait_for_answer(page, "：先从哪里开始")
    for body in model.requests[-2:]:  # not a glmkit server: the persona goes as a system prompt, every time
        assert body["messages"][0]["role"] == "system" and "苏梦远" in body["messages"][0]["content"]
        assert body["messages"][1] == {"role": "assistant", "content": "你好，我是苏梦远。今天想学哪首曲子？"}
    shot(page, "character")
    page.reload()  # the most recent conversation opens as it was left: mode and profile included
    page.wait_for_function("() => document.querySelector('#bot-name textarea')?.value === '苏梦远'")
    assert page.input_value("#greeting textarea").startswith("你好，我是苏梦远")


def test_the_system_prompt_goes_first(page, model):
    choose_mode(page, "chat")  # a new conversation keeps the mode the page was in
    page.fill("#system textarea", "你是一位诗人。")
    send(page, "写一句诗")
    wait_for_answer(page, "：写一句诗")
    assert model.requests[-1]["messages"][:2] == [{"role": "system", "content": "你是一位诗人。"},
                                                  {"role": "user", "content": "写一句诗"}]


def test_conversations_survive_a_restart_of_the_page(browser, model, tmp_path):
    store = tmp_path / "web.sqlite3"
    process = WebProcess(model.url, store)
    try:
        page = open_page(browser, process.address)
        send(page, "记住这句话")
        wait_for_answer(page, "：记住这句话")
        page.context.close()
    finally:
        process.stop()
    process = WebProcess(model.url, store)
    try:
        page = open_page(browser, process.address, new=False)
        page.wait_for_function("() => document.querySelector('#conversations').innerText.includes('记住这句话')")
        page.wait_for_function("() => [...document.querySelectorAll('#chat [data-testid=\"user\"]')]"
                               ".some(e => e.innerText.includes('记住这句话'))")
        shot(page, "restart")
        page.context.close()
    finally:
        process.stop()


def test_two_users_with_their_own_keys_see_only_their_own(browser, tmp_path):
    keyed = ScriptedServer(Answers(), piece_chars=8, keys=("key-anna", "key-bo"))
    process = WebProcess(keyed.url, tmp_path / "web.sqlite3")
    try:
        anna = open_page(browser, process.address, login=("anna", "key-anna"))
        bo = open_page(browser, process.address, login=("bo", "key-bo"))
        send(anna, "安娜的秘密")
        wait_for_answer(anna, "：安娜的秘密")
        choose_mode(anna, "code")
        send(anna, "运行 secret = 'anna'; print(secret)")
        wait_for_answer(anna, "运行结果：anna")
        bo.reload()
        bo.wait_for_selector("#message textarea")
        assert "安娜" not in bo.inner_text("#conversations")
        choose_mode(bo, "code")
        send(bo, "运行 print(secret)")
        wait_for_answer(bo, "运行结果")
        assert "NameError" in bot_texts(bo)[-1] or "NameError" in bo.inner_text("#chat")
        assert "安娜" not in bo.inner_text("#chat")
        # the keys went with each user's requests
        auth = [r for r in keyed.requests if "安娜" in json.dumps(r, ensure_ascii=False)]
        assert auth
        shot(bo, "second-user")
        anna.context.close()
        bo.context.close()
    finally:
        process.stop()
        keyed.close()


def test_a_wrong_key_does_not_log_in(browser, tmp_path):
    keyed = ScriptedServer(Answers(), keys=("right",))
    process = WebProcess(keyed.url, tmp_path / "web.sqlite3")
    try:
        assert login_refused(browser, process.address, "wrong")
    finally:
        process.stop()
        keyed.close()


def test_a_server_without_tool_calling_hides_the_tool_modes(browser, tmp_path):
    plain = ScriptedServer(Answers(), refuse_tools=True)
    process = WebProcess(plain.url, tmp_path / "web.sqlite3")
    try:
        page = open_page(browser, process.address)
        assert page.locator("#mode label").count() == 4
        choose_mode(page, "tools")
        send(page, "算 1+1")
        page.wait_for_function("() => document.querySelector('#stats').innerText.includes('does not take tools')")
        page.reload()
        page.wait_for_selector("#message textarea")
        page.wait_for_function("() => document.querySelectorAll('#mode label').length === 2")
        send(page, "普通的问题")
        wait_for_answer(page, "：普通的问题")
        page.context.close()
    finally:
        process.stop()
        plain.close()

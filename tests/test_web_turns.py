"""What the web page shows of a conversation (ui/web/turns.py), without a browser: text, tool calls as steps
with their observations, images after them, the index map that edit and retry use, and one answer turn fed
the agent's events."""

from __future__ import annotations

from glmkit.chat.tool_calls import ToolCall
from glmkit.tools.agent import AgentError, Final, TextDelta, ToolFinished, ToolStarted
from glmkit.tools.base import Image, Observation
from glmkit.ui.web.turns import Turn, api_messages, display

CONVERSATION = [
    {"role": "user", "content": "画图"},
    {"role": "assistant", "content": "好的。", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "python", "arguments": '{"code": "plot()"}'}},
        {"id": "c2", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "name": "python", "content": "[image 1]",
     "glmkit": {"images": ["/x/image-1.png"], "seconds": 1.234, "error": False}},
    {"role": "tool", "tool_call_id": "c2", "name": "calculator", "content": "boom",
     "glmkit": {"seconds": 0.01, "error": True}},
    {"role": "assistant", "content": "画好了。"},
    {"role": "user", "content": [{"type": "text", "text": "再来"}]},
]


def test_display_shows_steps_observations_and_images_in_order():
    shown = display(CONVERSATION)
    roles = [(m["role"], m.get("metadata", {}).get("title")) for m in shown.messages]
    assert roles == [("user", None), ("assistant", None), ("assistant", "⚙ python"), ("assistant", "⚙ calculator"),
                     ("assistant", None), ("assistant", None), ("user", None)]
    python, calculator = shown.messages[2], shown.messages[3]
    assert python["content"].startswith("```python\nplot()\n```") and "[image 1]" in python["content"]
    assert python["metadata"]["status"] == "done" and python["metadata"]["duration"] == 1.23
    assert '"expression": "6*7"' in calculator["content"] and "**error**" in calculator["content"]
    assert shown.messages[4]["content"] == {"path": "/x/image-1.png", "mime_type": "image/png"}
    assert shown.messages[6]["content"] == "再来"
    # each shown message points at the conversation message it shows (edit and retry use the users')
    assert shown.sources == [0, 1, 1, 1, 2, 4, 5]


def test_api_messages_drop_the_display_extras():
    sent = api_messages(CONVERSATION)
    assert all("glmkit" not in m for m in sent) and sent[2]["content"] == "[image 1]"
    assert "glmkit" in CONVERSATION[2]  # the stored conversation keeps them


def test_a_turn_fed_the_agents_events():
    saved = []
    turn = Turn([{"role": "user", "content": "6*7?"}], lambda png: saved.append(png) or f"/img/{len(saved)}.png")
    call = ToolCall("calculator", '{"expression": "6*7"}', "c9")
    for event in (TextDelta("我算一下。", 4), ToolStarted(call),
                  ToolFinished(call, Observation("42", images=[Image(b"\x89PNG")]), 0.5),
                  TextDelta("是 ", 2), TextDelta("42。", 2)):
        turn.feed(event)
    assert turn.figures.line().endswith("…")  # still streaming
    assert turn.messages[-1] == {"role": "assistant", "content": "是 42。"}
    turn.feed(Final("是 42。", "stop", [], 4, 12))
    assert [m["role"] for m in turn.messages] == ["user", "assistant", "tool", "assistant"]
    assert turn.messages[1]["content"] == "我算一下。" and turn.messages[1]["tool_calls"][0]["id"] == "c9"
    assert turn.messages[2]["glmkit"]["images"] == ["/img/1.png"] and saved == [b"\x89PNG"]
    assert turn.messages[-1]["glmkit"]["tokens"] == 12 and "12 tokens" in turn.figures.line()
    assert "tokens/s" in turn.figures.line()


def test_an_error_before_any_text_is_kept():
    turn = Turn([{"role": "user", "content": "hi"}], lambda png: "")
    turn.feed(AgentError("the server went away"))
    assert turn.error == "the server went away" and turn.figures.finish_reason == "error"

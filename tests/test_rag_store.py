"""The knowledge-base store, keyword tokens, retrieval and library (glmkit.rag.store/text/retrieve/library):
no models; dense search runs on small hand-made unit vectors."""

from __future__ import annotations

import multiprocessing
import sqlite3

import numpy as np
import pytest

from glmkit.errors import GlmkitError, InvalidParameterError
from glmkit.rag import Chunk, store
from glmkit.rag.library import Library, default_root
from glmkit.rag.retrieve import search
from glmkit.rag.store import DATABASE, KnowledgeBase, Settings
from glmkit.rag.text import words

PASSAGES = {
    "finance.md": "报销材料包括发票原件、审批单和银行卡信息，请在月底前提交到财务部。",
    "leave.md": "年假申请需要提前三天在系统中填写，并由直属经理审批。",
    "apt.md": "To install a package, run apt install followed by the name of the package.",
    "server.md": "The server listens on port 8080; error E1234 means max_queue requests are already waiting.",
    "fruit.md": "Bananas are rich in potassium and grow in tropical climates.",
}


def chunks(source: str, *texts: str, heading: str = "") -> list[Chunk]:
    return [Chunk(source, heading, None, t) for t in texts]


def unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def kb(tmp_path):
    with KnowledgeBase.create(tmp_path / "docs", Settings(tokenizer="test")) as kb:
        for source, text in PASSAGES.items():
            kb.replace(source, "sha-" + source, chunks(source, text), None)
        yield kb


@pytest.fixture
def vkb(tmp_path):
    """Four dimensions; chunk i's vector leans toward axis i."""
    with KnowledgeBase.create(tmp_path / "vec", Settings(embedding="toy", dimensions=4)) as kb:
        texts = ["alpha reactor cooling", "beta reactor", "gamma turbine", "delta turbine blades"]
        kb.replace("v.md", "d", chunks("v.md", *texts), np.eye(4, dtype=np.float32) * 3 + 0.2)
        yield kb


def ids_by_text(kb: KnowledgeBase) -> dict[str, int]:
    found = kb.chunks(range(1, 1000))
    return {c.text: i for i, c in found.items()}


def test_words_match_questions_to_passages():
    assert set(words("报销需要哪些材料")) <= set(words(PASSAGES["finance.md"]))
    assert words("installing packages") == words("install a package")
    assert {"e1234", "8080", "max_queue", "max", "queue"} <= set(words(PASSAGES["server.md"]))
    assert words("the of is a 的 了 是 在 和") == []


def test_create_open_and_persist(tmp_path):
    settings = Settings(embedding="toy", dimensions=2, chunk_tokens=200, overlap=20, tokenizer="glm-4")
    with KnowledgeBase.create(tmp_path / "kb", settings) as kb:
        kb.replace("a.md", "d1", [Chunk("a.md", "Intro > Setup", 3, "hello world")], np.array([[3.0, 4.0]]))
        assert kb.name == "kb" and kb.path == tmp_path / "kb"
    with pytest.raises(GlmkitError, match="already exists"):
        KnowledgeBase.create(tmp_path / "kb", settings)
    with KnowledgeBase.open(tmp_path / "kb") as kb:
        assert kb.settings == settings
        assert kb.count() == 1
        [entry] = kb.files()
        assert (entry.source, entry.digest, entry.chunks) == ("a.md", "d1", 1) and entry.added.startswith("20")
        [(chunk_id, cosine)] = kb.dense(np.array([3.0, 4.0]), 5)
        assert kb.chunks([chunk_id]) == {chunk_id: Chunk("a.md", "Intro > Setup", 3, "hello world")}
        assert cosine == pytest.approx(1.0)


def test_open_refuses_what_is_not_a_knowledge_base(tmp_path):
    with pytest.raises(GlmkitError, match="does not exist"):
        KnowledgeBase.open(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    sqlite3.connect(tmp_path / "other" / DATABASE).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(GlmkitError, match="not a glmkit knowledge base"):
        KnowledgeBase.open(tmp_path / "other")
    KnowledgeBase.create(tmp_path / "new", Settings()).close()
    db = sqlite3.connect(tmp_path / "new" / DATABASE)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(GlmkitError, match="format 99.*upgrade glmkit"):
        KnowledgeBase.open(tmp_path / "new")


def test_settings_are_checked():
    with pytest.raises(InvalidParameterError, match="dimensions"):
        Settings(embedding="toy")
    with pytest.raises(InvalidParameterError, match="overlap"):
        Settings(chunk_tokens=100, overlap=100)


def test_replace_replaces_remove_and_digest(kb):
    assert kb.digest("apt.md") == "sha-apt.md" and kb.digest("nothing.md") is None
    kb.replace("apt.md", "v2", chunks("apt.md", "Use snap to add applications.", "Flatpak also works."), None)
    assert kb.digest("apt.md") == "v2" and kb.count() == len(PASSAGES) + 1
    assert search(kb, "install package", mode="keyword") == []
    assert [h.chunk.text for h in search(kb, "snap applications")] == ["Use snap to add applications."]
    assert kb.remove("apt.md") and not kb.remove("apt.md")
    assert kb.digest("apt.md") is None and kb.count() == len(PASSAGES) - 1
    assert "apt.md" not in {f.source for f in kb.files()}
    assert search(kb, "flatpak") == []


def test_a_failed_replace_keeps_the_old_chunks(kb):
    broken = [Chunk("apt.md", "", None, "new text"), Chunk("apt.md", "", [1], "page of the wrong type")]
    with pytest.raises(sqlite3.Error):  # fails on the second insert, after the old chunks were deleted
        kb.replace("apt.md", "v2", broken, None)
    assert kb.digest("apt.md") == "sha-apt.md" and kb.count() == len(PASSAGES)
    assert [h.chunk.text for h in search(kb, "install package")] == [PASSAGES["apt.md"]]
    with pytest.raises(InvalidParameterError, match="chunk.source"):
        kb.replace("apt.md", "v2", chunks("other.md", "text"), None)


def test_vectors_must_match_the_chunks(vkb, kb):
    with pytest.raises(InvalidParameterError, match=r"shape \(2, 4\)"):
        vkb.replace("w.md", "d", chunks("w.md", "a", "b"), np.ones((2, 3)))
    with pytest.raises(InvalidParameterError, match=r"shape \(1, 4\)"):
        vkb.replace("w.md", "d", chunks("w.md", "a"), None)
    with pytest.raises(InvalidParameterError, match="keyword-only"):
        kb.replace("w.md", "d", chunks("w.md", "a"), np.ones((1, 4)))
    vkb.replace("empty.md", "d", [], None)  # a file with no text: recorded, nothing to embed
    assert vkb.digest("empty.md") == "d" and vkb.count() == 4
    with pytest.raises(GlmkitError, match="keyword"):
        kb.dense(np.ones(4), 3)


def test_keyword_search_chinese_and_english(kb):
    [hit] = search(kb, "报销需要哪些材料")
    assert hit.chunk.source == "finance.md" and hit.keyword == pytest.approx(1.0) and hit.dense is None
    assert hit.score == pytest.approx(1.0)
    assert [h.chunk.source for h in search(kb, "installing packages")] == ["apt.md"]
    assert [h.chunk.source for h in search(kb, "what does E1234 mean")] == ["server.md"]
    assert [h.chunk.source for h in search(kb, "max queue")] == ["server.md"]
    assert [h.chunk.source for h in search(kb, "年假怎么申请")] == ["leave.md"]


def test_coverage_threshold_and_stopwords(kb):
    assert search(kb, "quantum chromodynamics lattice") == []
    [(chunk_id, coverage)] = kb.keyword("installing kubernetes operators", 10)
    assert 0 < coverage < 0.5
    assert search(kb, "installing kubernetes operators") == []
    assert [h.chunk.source for h in search(kb, "installing kubernetes operators", min_keyword=0.1)] == ["apt.md"]
    assert kb.keyword("the of is", 10) == [] and search(kb, "是 的 了") == []


def test_common_words_leave_the_match_past_its_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "MATCH_BUDGET", 2)
    with KnowledgeBase.create(tmp_path / "c", Settings()) as kb:
        texts = ["apple banana", "apple cherry", "apple date", "banana cherry"]
        kb.replace("c.md", "d", chunks("c.md", *texts), None)
        text = {i: c.text for i, c in kb.chunks(range(1, 5)).items()}
        # "date" (1 chunk) is ranked; "apple" (3 more) would pass the budget: left out of the match
        assert [(text[i], c) for i, c in kb.keyword("apple date", 10)] == [("apple date", 1.0)]
        # even the rarest word is past the budget: only the chunks holding every word
        assert sorted(text[i] for i, _ in kb.keyword("apple", 10)) == texts[:3]
        # equally common: the first one only ("apple banana" holds half the words, yet is not ranked)
        found = {text[i]: c for i, c in kb.keyword("cherry banana", 10)}
        assert found == {"banana cherry": 1.0, "apple cherry": pytest.approx(0.5)}


def test_heading_is_searched(tmp_path):
    with KnowledgeBase.create(tmp_path / "h", Settings()) as kb:
        kb.replace("g.md", "d", chunks("g.md", "Run the command below.", heading="Firewall > nftables"), None)
        assert [h.chunk.heading for h in search(kb, "nftables firewall")] == ["Firewall > nftables"]


def test_dense_order_and_cache_refresh(vkb, tmp_path):
    by_text = ids_by_text(vkb)
    order = [i for i, _ in vkb.dense(unit(1, 0.5, 0, 0), 4)]
    assert order[:2] == [by_text["alpha reactor cooling"], by_text["beta reactor"]]
    cosines = [c for _, c in vkb.dense(unit(1, 0.5, 0, 0), 4)]
    assert cosines == sorted(cosines, reverse=True) and len(vkb.dense(unit(1, 0, 0, 0), 2)) == 2
    with KnowledgeBase.open(vkb.path) as other:  # another writer: the first object's cached matrix must refresh
        other.replace("x.md", "d", chunks("x.md", "epsilon"), unit(1, 0.5, 0, 0)[None])
    [(best, cosine)] = vkb.dense(unit(1, 0.5, 0, 0), 1)
    assert vkb.chunks([best])[best].text == "epsilon" and cosine == pytest.approx(1.0)
    vkb.remove("x.md")
    assert vkb.dense(unit(1, 0.5, 0, 0), 1)[0][0] == by_text["alpha reactor cooling"]


def test_dense_mode_needs_a_vector(vkb, kb):
    hits = search(vkb, "", unit(0, 0, 1, 0), mode="dense", top_k=1)
    assert [h.chunk.text for h in hits] == ["gamma turbine"] and hits[0].keyword is None
    with pytest.raises(InvalidParameterError, match="vector"):
        search(kb, "install", None, mode="dense")
    assert [h.chunk.source for h in search(kb, "install package", None, mode="hybrid")] == ["apt.md"]


def test_hybrid_fusion_order_and_scores(vkb):
    hits = search(vkb, "turbine blades", unit(0, 0, 0.5, 1), min_dense=0.3)
    # keyword: "delta turbine blades" (both words), then "gamma turbine" (one: under the 0.5 gate, but the best
    # passed it, and it is above half of it); dense: delta first, gamma second
    assert [h.chunk.text for h in hits] == ["delta turbine blades", "gamma turbine"]
    assert hits[0].score == pytest.approx(1.0)
    assert hits[1].score == pytest.approx((2 / 62) / (2 / 61))
    assert hits[0].keyword == pytest.approx(1.0) and hits[0].dense > hits[1].dense > 0.3
    assert 0.25 <= hits[1].keyword < 0.5
    # the gate is on the best: a strict dense threshold alone, with no keyword, finds nothing
    assert search(vkb, "submarine", unit(1, 1, 1, 1), min_dense=0.9) == []
    # past the gate the weaker candidates stay
    assert [h.chunk.text for h in search(vkb, "turbine blades", None, mode="keyword")] == \
        ["delta turbine blades", "gamma turbine"]


def test_chinese_question_skips_an_english_only_embedder(vkb):
    """dense_chinese=False: a Chinese question is searched by keyword alone, an English one by both."""
    vkb.replace("zh.md", "z", chunks("zh.md", "涡轮叶片的检修"), unit(0, 0, 0, 1)[None])
    hits = search(vkb, "涡轮叶片", unit(0, 0, 0, 1), dense_chinese=False)
    assert [h.chunk.text for h in hits] == ["涡轮叶片的检修"] and hits[0].dense is None
    assert hits[0].score == pytest.approx(1.0)  # one retriever ran: its rank 1 scores 1
    assert search(vkb, "涡轮叶片", unit(0, 0, 0, 1))[0].dense == pytest.approx(1.0)


def test_rerank_hook(vkb):
    def by_length(query: str, passages: list[str]) -> list[float]:
        assert query == "reactor turbine"
        return [len(p) for p in passages]

    hits = search(vkb, "reactor turbine", unit(1, 1, 1, 1), min_keyword=0.3, min_dense=0.0, rerank=by_length,
                  top_k=2)
    assert [h.chunk.text for h in hits] == ["alpha reactor cooling", "delta turbine blades"]
    assert [h.score for h in hits] == pytest.approx([1.0, 61 / 62])
    with pytest.raises(GlmkitError, match="one per passage"):
        search(vkb, "reactor", unit(1, 1, 1, 1), rerank=lambda q, p: [1.0])


@pytest.mark.parametrize("arguments, field", [({"top_k": 0}, "top_k"), ({"top_k": 101}, "top_k"),
                                              ({"mode": "fuzzy"}, "mode"), ({"min_keyword": 1.5}, "min_keyword"),
                                              ({"min_dense": "high"}, "min_dense"), ({"candidates": 0}, "candidates")])
def test_search_parameters_are_checked(kb, arguments, field):
    with pytest.raises(InvalidParameterError) as caught:
        search(kb, "install", **arguments)
    assert caught.value.field == field


def _add_files(path, prefix: str, files: int, per_file: int, barrier) -> None:
    with KnowledgeBase.open(path) as kb:
        barrier.wait()
        for f in range(files):
            source = f"{prefix}{f}.md"
            kb.replace(source, "d", chunks(source, *(f"{prefix} passage {f} {i} 内容" for i in range(per_file))),
                       None)


def test_two_processes_add_at_once(tmp_path):
    KnowledgeBase.create(tmp_path / "shared", Settings()).close()
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_add_files, args=(tmp_path / "shared", p, 5, 40, barrier)) for p in "ab"]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    with KnowledgeBase.open(tmp_path / "shared") as kb:
        assert kb.count() == 400 and len(kb.files()) == 10
        assert len(kb.chunks(range(1, 1000))) == 400
        assert len(kb.keyword("passage", 1000)) == 400


def test_library(tmp_path, monkeypatch):
    library = Library(tmp_path / "kb")
    assert library.names() == []
    for name in ("手册", "my-kb.v2", "a_b"):
        library.create(name, Settings()).close()
    assert library.names() == sorted(["手册", "my-kb.v2", "a_b"]) and library.exists("手册")
    with library.open("手册") as kb:
        assert kb.name == "手册" and kb.count() == 0
    with pytest.raises(GlmkitError, match="already exists"):
        library.create("a_b", Settings())
    with pytest.raises(GlmkitError) as caught:
        library.open("manuals")
    assert "'manuals'" in str(caught.value) and "a_b, my-kb.v2, 手册" in str(caught.value)
    assert "glmkit kb create manuals" in str(caught.value)
    library.delete("a_b")
    assert library.names() == sorted(["手册", "my-kb.v2"])
    with pytest.raises(GlmkitError, match="no knowledge base named 'a_b'"):
        library.delete("a_b")
    monkeypatch.setenv("GLMKIT_HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / "kb"
    monkeypatch.delenv("GLMKIT_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_root() == tmp_path / "data" / "glmkit" / "kb"


@pytest.mark.parametrize("name", ["", ".hidden", "..", "a/b", "a b", "x" * 65, "../escape", "a\\b"])
def test_library_names_are_checked(tmp_path, name):
    with pytest.raises(InvalidParameterError, match="1 to 64 characters") as caught:
        Library(tmp_path).create(name, Settings())
    assert caught.value.field == "name"
    assert not any(tmp_path.iterdir())

"""Knowledge-base speed on this machine: indexing rate, embedding rate and query latency at growing sizes.

    python benchmarks/rag_speed.py [--sizes 10000 100000] [--queries 200] [--embed 256] [--dir DIR]

Chunks are real text: the Debian Reference (English and Simplified Chinese HTML, /usr/share/debian-reference),
tags stripped, cut into 300-character pieces; beyond the ~2,900 pieces it has, further chunks join the halves of
two random pieces, so every chunk is distinct and the words keep their real distribution. They are added 100 to
a file through KnowledgeBase.replace (tokenizing included), growing one knowledge base through each size.

Vectors in the store are random unit vectors of 384 dimensions (all-MiniLM-L6-v2's): embedding 100k chunks on a
small CPU takes far longer than the rest together, and a query's latency does not depend on the numbers. The
embedding rate is measured apart, with the default embedder on --embed chunks. Latency is of retrieve.search
(the query's embedding excluded), with thresholds off (every candidate kept and fetched): the worst case.

The alternative keyword engine, bm25s (a sparse-matrix BM25 in numpy), is measured on the same tokens at the
largest size when installed: it has no incremental add or remove, so every change to a file rebuilds its index
(the index time below), where FTS5 replaces one file's chunks in place."""

from __future__ import annotations

import argparse
import html
import os
import random
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from glmkit.rag import Chunk
from glmkit.rag.retrieve import search
from glmkit.rag.store import DATABASE, KnowledgeBase, Settings
from glmkit.rag.text import words

DEBIAN_REFERENCE = Path("/usr/share/debian-reference")
DIMENSIONS = 384
PER_FILE = 100
PIECE_CHARS = 300
QUESTIONS = ["how do I install a package with apt", "configure a static IP address", "mount a USB storage device",
             "set the system locale and keyboard layout", "back up the home directory with rsync",
             "what does the boot loader do", "change the default login shell", "set up a packet filter firewall",
             "如何用 apt 安装软件包", "怎样配置静态 IP 地址", "挂载 USB 存储设备", "设置系统语言环境", "备份用户主目录",
             "引导加载程序的作用", "修改默认的登录 shell", "日志文件在哪里"]


def pieces(language: str) -> list[str]:
    """The reference's text in one language, tags and entities gone, in PIECE_CHARS-character pieces."""
    out = []
    for page in sorted(DEBIAN_REFERENCE.glob(f"*.{language}.html")):
        text = page.read_text(encoding="utf-8")
        text = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", text)
        text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())
        out += [text[i:i + PIECE_CHARS] for i in range(0, len(text), PIECE_CHARS)]
    return out


def corpus(base: list[str], n: int, rng: random.Random) -> list[str]:
    """n chunk texts: the real pieces first, then joined halves of two random pieces (cut at a random point)."""
    texts = base[:n]
    while len(texts) < n:
        a, b = rng.choice(base), rng.choice(base)
        texts.append(a[rng.randrange(len(a) // 2 + 1):] + " " + b[:rng.randrange(len(b) // 2, len(b) + 1)])
    return texts


def unit_vectors(n: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal((n, DIMENSIONS), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def add(kb: KnowledgeBase, texts: list[str], first: int, vectors: np.ndarray) -> float:
    """Adds texts as files of PER_FILE chunks; the seconds it took."""
    start = time.perf_counter()
    for offset in range(0, len(texts), PER_FILE):
        source = f"doc{(first + offset) // PER_FILE:05d}.md"
        batch = texts[offset:offset + PER_FILE]
        kb.replace(source, "x", [Chunk(source, "", None, t) for t in batch], vectors[offset:offset + len(batch)])
    return time.perf_counter() - start


def queries(texts: list[str], n: int, rng: random.Random) -> list[str]:
    """The fixed questions, then snippets of random chunks (8 words, or 12 characters of Chinese)."""
    out = list(QUESTIONS)
    while len(out) < n:
        text = rng.choice(texts)
        if re.search(r"[\u4e00-\u9fff]", text):
            at = rng.randrange(max(len(text) - 12, 1))
            out.append(text[at:at + 12])
        else:
            tokens = text.split()
            at = rng.randrange(max(len(tokens) - 8, 1))
            out.append(" ".join(tokens[at:at + 8]))
    return out[:n]


def percentiles(run: Callable[[str], object], qs: list[str]) -> tuple[float, float]:
    """(p50, p99) in milliseconds, after one warm-up call."""
    run(qs[0])
    times = []
    for q in qs:
        start = time.perf_counter()
        run(q)
        times.append((time.perf_counter() - start) * 1000)
    cuts = statistics.quantiles(times, n=100)
    return cuts[49], cuts[98]


def embedding_rate(texts: list[str]) -> str:
    try:
        from glmkit.rag.embeddings import Embedder

        model = Embedder("default").model
    except Exception as e:  # the embeddings extra not installed: the rest still runs
        return f"skipped: {e}"
    model.encode(texts[:32], batch_size=32)  # warm-up
    start = time.perf_counter()
    model.encode(texts, batch_size=32)
    return f"{len(texts) / (time.perf_counter() - start):,.0f} chunks/s"


def bm25s_rows(kb: KnowledgeBase, qs: list[str]) -> list[tuple[str, str, str]]:
    try:
        import bm25s
    except ImportError:
        return [("bm25s", "skipped", "not installed (pip install bm25s)")]
    # The store's own tokens, read straight from its FTS table: both engines see the same words.
    db = sqlite3.connect(kb.path / DATABASE)
    corpus_tokens = [row[0].split() for row in db.execute("SELECT words FROM keywords ORDER BY rowid")]
    db.close()
    start = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(corpus_tokens, show_progress=False)
    built = time.perf_counter() - start
    query_tokens = [words(q) or ["the"] for q in qs]
    p50, p99 = percentiles(lambda q: retriever.retrieve([q], k=50, show_progress=False, n_threads=1),
                           query_tokens)
    n = len(corpus_tokens)
    return [(f"bm25s index {n:,} chunks", f"{built:.1f} s", f"{n / built:,.0f} chunks/s; whole rebuild on any "
                                                            "change (no incremental add/remove)"),
            (f"bm25s query @ {n:,}", f"p50 {p50:.1f} ms  p99 {p99:.1f} ms", "top 50, same tokens; no chunk fetch")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="knowledge-base sizes "
                        "(chunks) to measure queries at, ascending (default 10000 100000)")
    parser.add_argument("--queries", type=int, default=200, help="queries per mode and size (default 200)")
    parser.add_argument("--embed", type=int, default=256, help="chunks embedded by the default embedder to "
                        "measure its rate; 0 skips (default 256)")
    parser.add_argument("--dir", type=Path, help="where to build the knowledge base (default: a temporary folder)")
    args = parser.parse_args()
    if not DEBIAN_REFERENCE.is_dir():
        sys.exit(f"{DEBIAN_REFERENCE} is missing: apt-get install debian-reference-en debian-reference-zh-cn")
    rng, vector_rng = random.Random(0), np.random.default_rng(0)
    en, zh = pieces("en"), pieces("zh-cn")
    texts = corpus(en + zh, max(args.sizes), rng)
    rng.shuffle(texts)
    qs = queries(texts, args.queries, rng)
    words("预热")  # jieba's dictionary loads once per process: not part of any rate
    print(f"corpus: {len(en):,} English + {len(zh):,} Chinese pieces of {PIECE_CHARS} characters, recombined to "
          f"{len(texts):,} chunks; store vectors are RANDOM unit vectors ({DIMENSIONS} dims)\n"
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the start (other work on the "
          "machine slows every row)\n", flush=True)
    show(tokenize_rate("English", en), tokenize_rate("Chinese", zh))
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        kb = KnowledgeBase.create(Path(folder) / "bench", Settings(embedding="random", dimensions=DIMENSIONS))
        done = 0
        for size in sorted(args.sizes):
            seconds = add(kb, texts[done:size], done, unit_vectors(size - done, vector_rng))
            show((f"index {done:,} -> {size:,} chunks", f"{(size - done) / seconds:,.0f} chunks/s",
                  f"{seconds:.1f} s, tokenizing included; files of {PER_FILE} chunks"))
            done = size
            show(*query_rows(kb, qs, size, vector_rng))
        show(replace_row(kb, texts, vector_rng))
        size_mb = sum(p.stat().st_size for p in Path(folder, "bench").iterdir()) / 2**20
        show((f"on disk @ {done:,}", f"{size_mb:,.0f} MB",
              f"database + WAL; {DIMENSIONS}-dim float32 vectors are {done * DIMENSIONS * 4 / 2**20:,.0f} MB"))
        show(*bm25s_rows(kb, qs))
        kb.close()
    if args.embed:
        show((f"embed {args.embed:,} chunks (default embedder)", embedding_rate(texts[:args.embed]),
              "all-MiniLM-L6-v2 on CPU, batch 32: the bulk of indexing with vectors"))


def tokenize_rate(language: str, sample: list[str]) -> tuple[str, str, str]:
    start = time.perf_counter()
    for text in sample:
        words(text)
    seconds = time.perf_counter() - start
    return (f"tokenize {language} ({len(sample):,} pieces)", f"{len(sample) / seconds:,.0f} chunks/s",
            "glmkit.rag.text.words: jieba for Chinese, PyStemmer for English")


def query_rows(kb: KnowledgeBase, qs: list[str], size: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    vectors = {q: v for q, v in zip(qs, unit_vectors(len(qs), rng))}
    start = time.perf_counter()
    kb.dense(vectors[qs[0]], 1)
    load = time.perf_counter() - start
    rows = [(f"dense matrix load @ {size:,}", f"{load * 1000:,.0f} ms", "first dense query after a change")]
    for mode in ("keyword", "dense", "hybrid"):
        p50, p99 = percentiles(lambda q: search(kb, q, vectors[q], mode=mode, min_keyword=0, min_dense=-1), qs)
        rows.append((f"query {mode} @ {size:,}", f"p50 {p50:.1f} ms  p99 {p99:.1f} ms",
                     f"{len(qs)} queries, top 5 of 50 candidates, thresholds off"))
    return rows


def replace_row(kb: KnowledgeBase, texts: list[str], rng: np.random.Generator) -> tuple[str, str, str]:
    """Re-adding one file of a large knowledge base: FTS5 updates in place, whatever the size."""
    source = "doc00000.md"
    chunks = [Chunk(source, "", None, t) for t in texts[:PER_FILE]]
    vectors = unit_vectors(PER_FILE, rng)
    start = time.perf_counter()
    kb.replace(source, "y", chunks, vectors)
    seconds = time.perf_counter() - start
    return (f"replace one file @ {kb.count():,}", f"{seconds * 1000:,.0f} ms", f"{PER_FILE} chunks, old ones "
                                                                               "deleted, one transaction")


def show(*rows: tuple[str, str, str]) -> None:
    """Prints rows as they are measured: a long run shows its progress."""
    for name, value, note in rows:
        print(f"{name:<38}  {value:<28}  {note}", flush=True)


if __name__ == "__main__":
    main()

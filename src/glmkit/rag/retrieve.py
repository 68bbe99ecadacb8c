"""Search a knowledge base: keyword (FTS5 BM25) and dense (cosine) candidates fused by reciprocal rank.

Relevance is decided once, on the best candidates: when neither retriever's best passes its threshold (the share
of the question's words a passage holds, weighted by rarity; the cosine), the answer is [] ("not in the
documents"), never the least bad chunks. Past that gate, candidates are kept down to half the thresholds:
filtering each one at the full threshold dropped most right answers whose passage words the question
differently. The keyword gate, 0.3, comes from benchmarks/rag_quality.py (Debian Reference): the best coverage
of on-topic questions was 0.35 or more in English and under 0.3 for 5 of 42 in Chinese; of 10 off-topic
questions per language, 2 English ones reached 0.36 and 0.42, no Chinese one 0.3.

Reciprocal rank fusion needs no calibration between BM25 scores and cosines (they are on unrelated scales);
each retriever only contributes ranks. A reranker, when given, orders the fused candidates instead. A Chinese
question skips an English-only embedder (`dense_chinese=False`): its ranking of Chinese text is noise (Chinese
Hits@5 0.19 dense alone), and fused in it cut Chinese Hits@1 from 0.57 to 0.26."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import GlmkitError, InvalidParameterError, ModelLoadError
from . import Hit
from .store import KnowledgeBase
from .text import language

MODES = ("hybrid", "keyword", "dense")
MAX_TOP_K = 100
MAX_CANDIDATES = 1000
RRF_K = 60  # the constant of Cormack et al. (2009): damps the lead of rank 1 over rank 2
Rerank = Callable[[str, list[str]], list[float]]  # (query, passages) -> one relevance score each, higher better


def search(kb: KnowledgeBase, query: str, vector: np.ndarray | None = None, *, top_k: int = 5,
           mode: str = "hybrid", min_keyword: float = 0.3, min_dense: float = 0.5, candidates: int = 50,
           rerank: Rerank | None = None, dense_chinese: bool = True) -> list[Hit]:
    """The best `top_k` chunks for `query` (and its embedding `vector`), best first; [] when neither retriever's
    best candidate passes its threshold. mode "hybrid" without a vector (a keyword-only knowledge base), or for a
    Chinese query with dense_chinese=False, searches by keyword alone."""
    _check(top_k, mode, min_keyword, min_dense, candidates)
    if mode == "dense" and vector is None:
        raise InvalidParameterError("vector", None, "mode='dense' needs the query's embedding vector; pass it, or "
                                    "use mode='keyword' (a keyword-only knowledge base has no vectors)")
    if mode == "hybrid" and not dense_chinese and language(query) == "zh":
        vector = None
    use_keyword, use_dense = mode != "dense", mode != "keyword" and vector is not None
    keyword = dict(kb.keyword(query, candidates)) if use_keyword else {}  # chunk id -> coverage, best BM25 first
    dense = dict(kb.dense(vector, candidates)) if use_dense else {}  # chunk id -> cosine, most similar first
    if max(keyword.values(), default=0.0) < min_keyword and max(dense.values(), default=-1.0) < min_dense:
        return []
    keyword = {i: s for i, s in keyword.items() if s >= min_keyword / 2}
    dense = {i: s for i, s in dense.items() if s >= min_dense / 2}
    fused = _fuse([r for r, used in ((keyword, use_keyword), (dense, use_dense)) if used])[:candidates]
    if rerank is not None and fused:
        fused = _reranked(rerank, query, fused, kb.chunks(i for i, _ in fused))
    fused = fused[:top_k]
    found = kb.chunks(i for i, _ in fused)  # a chunk removed since it was ranked is left out
    return [Hit(found[i], score, keyword.get(i), dense.get(i)) for i, score in fused if i in found]


def load_reranker(path: str) -> Rerank:
    """A cross-encoder from a local sentence-transformers folder (e.g. bge-reranker-base) as a `rerank`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"reranker path {path!r} is not a folder; pass a local sentence-transformers "
                             "CrossEncoder model folder (e.g. bge-reranker-base)")
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
        from sentence_transformers import CrossEncoder
    except ImportError:
        raise ModelLoadError("a reranker needs sentence-transformers: pip install 'glmkit[embeddings]'") from None
    model = CrossEncoder(str(folder), device="cpu")
    return lambda query, passages: model.predict([(query, p) for p in passages]).tolist()


def _check(top_k, mode, min_keyword, min_dense, candidates) -> None:
    if not _integer(top_k) or not 1 <= top_k <= MAX_TOP_K:
        raise InvalidParameterError("top_k", top_k, f"must be an integer from 1 to {MAX_TOP_K}")
    if mode not in MODES:
        raise InvalidParameterError("mode", mode, f"must be one of {', '.join(MODES)}")
    if not _number(min_keyword) or not 0 <= min_keyword <= 1:
        raise InvalidParameterError("min_keyword", min_keyword, "must be a number from 0 to 1 (the share of the "
                                    "question's words a passage must hold)")
    if not _number(min_dense) or not -1 <= min_dense <= 1:
        raise InvalidParameterError("min_dense", min_dense, "must be a number from -1 to 1 (a cosine similarity)")
    if not _integer(candidates) or not 1 <= candidates <= MAX_CANDIDATES:
        raise InvalidParameterError("candidates", candidates, f"must be an integer from 1 to {MAX_CANDIDATES}")


def _fuse(rankings: list[dict[int, float]]) -> list[tuple[int, float]]:
    """Reciprocal rank fusion, scaled so that rank 1 in every active retriever scores 1.0."""
    best = len(rankings) / (RRF_K + 1)
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, chunk_id in enumerate(ranking, 1):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + 1 / (RRF_K + rank)
    return sorted(((i, s / best) for i, s in scores.items()), key=lambda item: -item[1])


def _reranked(rerank: Rerank, query: str, fused: list[tuple[int, float]], found: dict) -> list[tuple[int, float]]:
    """The candidates in the reranker's order, scored by that rank as fusion scores a single retriever's."""
    fused = [(i, s) for i, s in fused if i in found]
    scores = list(rerank(query, [found[i].text for i, _ in fused]))
    if len(scores) != len(fused):
        raise GlmkitError(f"the reranker returned {len(scores)} scores for {len(fused)} passages; it must return "
                          "one per passage")
    order = sorted(range(len(fused)), key=lambda j: -scores[j])
    return [(fused[j][0], (RRF_K + 1) / (RRF_K + rank)) for rank, j in enumerate(order, 1)]


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

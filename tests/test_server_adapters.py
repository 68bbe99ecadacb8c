"""LoRA adapters over HTTP, on real `glmkit serve` processes over the tiny ChatGLM checkpoint (CPU, fp32): an
adapter given with --adapter is a `model` of every generating route and of /v1/models (with its parent), and a
greedy answer through it is the base model's with the adapter folded into its weights (a second server serves
that merged checkpoint), and not the base's own; vLLM's load/unload routes add and remove adapters at runtime,
with 400/404/409 errors and the API key; /metrics counts requests and tokens per model name. An unload that
finds the adapter still running a request answers 409 (in process, with a short wait)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from adapter_fixtures import make_adapter, make_prefix
from checkpoint_fixtures import FFN, make_chatglm_dir
from server_api_support import make_app, state_of, wait_until
from server_fixtures import ServerProcess

from glmkit.models.lora import merge_into, read_adapter
from glmkit.server import adapter_routes

KEY = "sk-adapters"
AUTH = {"Authorization": f"Bearer {KEY}"}
SERVE_ARGS = ("--served-model-name", "tiny", "--dtype", "float32", "--device", "cpu", "--threads", "1",
              "--kv-cache-memory", "0.05", "--embedding-model", "none")
CHAT, COMPLETIONS, LEGACY = "/v1/chat/completions", "/v1/completions", "/"
QUESTION = "晚上睡不着应该怎么办"


@pytest.fixture(scope="module")
def adapters(glm_dir, sp_model_path, sp, tmp_path_factory):
    root = tmp_path_factory.mktemp("http-adapters")
    other_model = make_chatglm_dir(root / "other-model", sp_model_path, sp.vocab_size, seed=3, ffn_hidden_size=2 * FFN)
    return {"a": make_adapter(glm_dir, root / "a", ["query_key_value"], 4, seed=1, scale=0.5),
            "b": make_adapter(glm_dir, root / "b", ["all-linear"], 8, seed=2, scale=0.5),
            "other": make_adapter(other_model, root / "other", ["dense_h_to_4h"], 4, seed=4, scale=0.5),
            "prefix": make_prefix(glm_dir, root / "prefix", 16, False, seed=5)}


@pytest.fixture(scope="module")
def server(glm_dir, adapters):
    process = ServerProcess("--model", str(glm_dir), *SERVE_ARGS, "--api-key", KEY, "--adapter", f"a={adapters['a']}")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def merged(glm_dir, adapters, tmp_path_factory):
    """A server of the checkpoint with adapter `a` folded into its weights."""
    out = merge_into(glm_dir, read_adapter(adapters["a"]), tmp_path_factory.mktemp("merged") / "tiny-a")
    process = ServerProcess("--model", str(out), *SERVE_ARGS)
    yield process
    process.stop()


def post(server, path: str, body: dict, headers=AUTH) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    if code is not None:
        assert err["code"] == code, err
    return err


def chat(server, model: str, headers=AUTH) -> str:
    r = post(server, CHAT, {"model": model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
                            "max_tokens": 10, "ignore_eos": True}, headers)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return r.json()["choices"][0]["message"]["content"]


def complete(server, model: str, headers=AUTH) -> str:
    r = post(server, COMPLETIONS, {"model": model, "prompt": "1 2 3 4", "temperature": 0, "max_tokens": 10,
                                   "ignore_eos": True}, headers)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def legacy(server, model: str | None, headers=AUTH) -> str:
    body = {"prompt": QUESTION, "temperature": 0.01, "top_p": 0.01, "max_length": 40}  # 0 means "the default"
    r = post(server, LEGACY, body if model is None else {**body, "model": model}, headers)
    assert r.status_code == 200, r.text
    return r.json()["response"]


def models(server) -> dict[str, dict]:
    r = httpx.get(server.url + "/v1/models", headers=AUTH)
    assert r.status_code == 200, r.text
    return {card["id"]: card for card in r.json()["data"]}


def metrics(server) -> str:
    return httpx.get(server.url + "/metrics", headers=AUTH).text


def test_v1_models_lists_the_adapter_with_its_parent(server, adapters):
    cards = models(server)
    assert cards["tiny"]["parent"] is None and cards["tiny"]["object"] == "model"
    assert cards["a"] == {**cards["a"], "object": "model", "owned_by": "glmkit", "parent": "tiny",
                          "root": str(adapters["a"])}
    r = httpx.get(server.url + "/v1/models/a", headers=AUTH)
    assert r.status_code == 200 and r.json() == cards["a"]


def test_an_adapter_answers_as_its_weights_folded_in(server, merged):
    for ask in (chat, complete):
        through_adapter = ask(server, "a")
        assert through_adapter == ask(merged, "tiny", headers={}), ask.__name__
        assert through_adapter != ask(server, "tiny"), ask.__name__
    assert legacy(server, "a") == legacy(merged, None, headers={}) != legacy(server, None)
    assert legacy(server, "tiny") == legacy(server, None)


def test_every_generating_route_takes_the_adapter_name(server):
    r = post(server, "/v1/responses", {"model": "a", "input": QUESTION, "max_output_tokens": 4})
    assert r.status_code == 200 and r.json()["model"] == "a", r.text
    r = post(server, "/v1/messages", {"model": "a", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["model"] == "a", r.text
    r = post(server, CHAT, {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                            "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text


def test_an_unknown_model_is_a_404_naming_the_models_and_adapters(server):
    for path, body in ((CHAT, {"messages": [{"role": "user", "content": "hi"}]}), (COMPLETIONS, {"prompt": "hi"}),
                       (LEGACY, {"prompt": "hi"}), ("/v1/responses", {"input": "hi"})):
        err = error(post(server, path, {**body, "model": "nope"}), 404, "model_not_found")
        assert "'nope'" in err["message"] and "tiny" in err["message"] and "adapters: a" in err["message"], err
    r = post(server, "/v1/messages", {"model": "nope", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "adapters: a" in r.json()["error"]["message"], r.text
    error(httpx.get(server.url + "/v1/models/nope", headers=AUTH), 404, "model_not_found")


def test_load_use_and_unload_an_adapter_at_runtime(server, adapters):
    base = chat(server, "tiny")
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(adapters["b"])})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'b' added successfully.", r.text
    assert models(server)["b"]["parent"] == "tiny" and models(server)["b"]["root"] == str(adapters["b"])
    assert chat(server, "b") != base
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "b", "lora_int_id": 7})  # vLLM's id: ignored
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'b' removed successfully.", r.text
    assert "b" not in models(server)
    error(post(server, CHAT, {"model": "b", "messages": [{"role": "user", "content": "hi"}]}), 404, "model_not_found")
    # loaded again under the same name after the unload
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(adapters["b"])}).status_code == 200
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "b"}).status_code == 200


def test_a_p_tuning_prefix_loads_and_answers_through_the_same_routes(server, adapters):
    """ChatGLM's P-Tuning v2 output (no adapter_config.json) loads by vLLM's route too and changes the answer."""
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "pt", "lora_path": str(adapters["prefix"])})
    assert r.status_code == 200, r.text
    assert chat(server, "pt") not in (chat(server, "tiny"), chat(server, "a"))
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "pt"}).status_code == 200


def test_load_errors(server, adapters, tmp_path):
    load = "/v1/load_lora_adapter"
    err = error(post(server, load, {"lora_name": "a", "lora_path": str(adapters["b"])}), 400, "invalid_value")
    assert "already loaded" in err["message"] and err["param"] == "lora_name", err
    err = error(post(server, load, {"lora_name": "tiny", "lora_path": str(adapters["b"])}), 400, "invalid_value")
    assert "served under" in err["message"], err
    err = error(post(server, load, {"lora_name": "-bad name", "lora_path": str(adapters["b"])}), 400)
    assert err["param"] == "lora_name" and "letters, digits" in err["message"], err
    # no adapter at the path: vLLM's 404 ("No adapter found")
    err = error(post(server, load, {"lora_name": "c", "lora_path": str(tmp_path / "missing")}), 404,
                "adapter_not_found")
    assert err["param"] == "lora_path" and "adapter_config.json" in err["message"], err
    error(post(server, load, {"lora_name": "c", "lora_path": "~no-such-user-here/x"}), 404, "adapter_not_found")
    error(post(server, load, {"lora_name": "c", "lora_path": "x" * 5000}), 404, "adapter_not_found")
    # an adapter that is there but broken, or made for another model
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapters["a"] / "adapter_config.json").read_text())
    err = error(post(server, load, {"lora_name": "c", "lora_path": str(broken)}), 400, "invalid_adapter")
    assert "no adapter weights" in err["message"], err
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    err = error(post(server, load, {"lora_name": "c", "lora_path": str(broken)}), 400, "invalid_adapter")
    assert err["param"] == "lora_path", err
    err = error(post(server, load, {"lora_name": "c", "lora_path": str(adapters["other"])}), 400, "invalid_adapter")
    assert str(adapters["other"]) in err["message"] and "do not fit" in err["message"], err
    # malformed bodies
    for body in ({"lora_name": "c"}, {"lora_path": str(adapters["b"])}, {"lora_name": "", "lora_path": "x"},
                 {"lora_name": 3, "lora_path": str(adapters["b"])}, []):
        error(post(server, load, body), 400)
    assert "c" not in models(server) and set(models(server)) == {"tiny", "a"}


def test_unload_errors(server):
    err = error(post(server, "/v1/unload_lora_adapter", {"lora_name": "nope"}), 404, "adapter_not_found")
    assert "loaded adapters: a" in err["message"], err
    error(post(server, "/v1/unload_lora_adapter", {"lora_name": "tiny"}), 404, "adapter_not_found")
    error(post(server, "/v1/unload_lora_adapter", {}), 400)


def test_the_adapter_routes_need_the_api_key(server, adapters):
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(adapters["b"])}),
                       ("/v1/unload_lora_adapter", {"lora_name": "a"})):
        error(post(server, path, body, headers={}), 401, "invalid_api_key")
        error(post(server, path, body, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    assert set(models(server)) == {"tiny", "a"}
    schema = httpx.get(server.url + "/openapi.json", headers=AUTH).json()
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        operation = schema["paths"][path]["post"]
        assert operation["security"] and "401" in operation["responses"] and "requestBody" in operation, path


def sample(text: str, name: str, model: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(f'{name}{{model="{model}"}} '))
    return float(line.rpartition(" ")[2])


def test_metrics_count_requests_and_tokens_per_model(server):
    before = metrics(server)
    complete(server, "a")  # 10 tokens each (no stop tokens: ignore_eos)
    chat(server, "a")
    complete(server, "tiny")
    legacy(server, None)  # the base, counted under its first served name
    after = metrics(server)
    assert "# TYPE glmkit_model_requests_total counter" in after
    for model, requests, tokens in (("a", 2, 11), ("tiny", 2, 10)):
        assert sample(after, "glmkit_model_requests_total", model) - sample(
            before, "glmkit_model_requests_total", model) == requests, after
        assert sample(after, "glmkit_model_generation_tokens_total", model) - sample(
            before, "glmkit_model_generation_tokens_total", model) >= tokens, after
        assert sample(after, "glmkit_model_prompt_tokens_total", model) > 0
    # a request refused before it ran counts for no model
    error(post(server, CHAT, {"model": "a", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}), 400)
    assert sample(metrics(server), "glmkit_model_requests_total", "a") == sample(after, "glmkit_model_requests_total",
                                                                                 "a")


def test_an_adapter_still_running_a_request_is_a_409_and_stays(glm_dir, adapters, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.setattr(adapter_routes, "UNLOAD_WAIT_S", 0.3)
    app = make_app(glm_dir, engine_kwargs=dict(dtype="float32", device="cpu", kv_cache_memory_gb=0.02,
                                               adapters={"a": str(adapters["a"])}))
    with TestClient(app) as client:
        state = state_of(app)
        engine = state.llm.engine
        step = engine.step

        def slow_step():  # the long answer (200 steps, 4 s or more) is still running when the unload gives up
            time.sleep(0.02)
            return step()

        monkeypatch.setattr(engine, "step", slow_step)
        answers = []
        # a raw completion: ignore_eos holds (a chat answer would still end at the format's own stop tokens)
        long = threading.Thread(target=lambda: answers.append(client.post(COMPLETIONS, json={
            "model": "a", "prompt": "hi", "max_tokens": 200, "ignore_eos": True})))
        long.start()
        assert wait_until(lambda: state.in_flight == 1, 10)
        time.sleep(0.2)
        r = client.post("/v1/unload_lora_adapter", json={"lora_name": "a"})
        err = error(r, 409, "adapter_in_use")
        assert "running request" in err["message"], err
        assert "a" in [card["id"] for card in client.get("/v1/models").json()["data"]]
        long.join(60)
        assert answers and answers[0].status_code == 200, answers
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 200
        gone = client.post(CHAT, json={"model": "a", "messages": [{"role": "user", "content": "hi"}]})
        assert gone.status_code == 404, gone.text

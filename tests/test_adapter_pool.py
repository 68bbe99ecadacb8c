"""LoRA adapters in GPU-style slots (models/adapters.py pooled, kernels/lora.py): the weight pools CUDA graphs
replay with. Here on the CPU through Triton's interpreter, with fewer slots than adapters, so a step's adapters
are swapped in over the least recently used and a step with more adapters than slots runs in passes: every
request still gets exactly the tokens the unpooled path on the CPU (grouped rows, checked against peft and folded
weights in test_adapter_serving.py) gives it alone. With a GPU the same runs there, CUDA graphs included."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from adapter_fixtures import make_adapter, make_prefix
from glmkit import LLM
from glmkit.engine.sampling_params import SamplingParams
from glmkit.errors import ModelLoadError
from glmkit.kernels.lora import add_lora, lora_rows

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # without CUDA the kernel runs in Triton's interpreter

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = ["你好", "hello there"]


@pytest.fixture(scope="module")
def adapters(glm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pooled")
    return {"qkv4": make_adapter(glm_dir, root / "qkv4", ["query_key_value"], 4, seed=11),
            "all8": make_adapter(glm_dir, root / "all8", ["all-linear"], 8, seed=12),
            "mlp2": make_adapter(glm_dir, root / "mlp2", ["dense_h_to_4h", "dense_4h_to_h"], 2, seed=13),
            "prefix": make_prefix(glm_dir, root / "prefix", 16, False, seed=14)}


def serve(glm_dir, adapters, slots: int, monkeypatch=None) -> LLM:
    """slots 0: the unpooled path on the CPU; else pooled on DEVICE with that many slots of rank 8."""
    paths = {k: str(v) for k, v in adapters.items()}
    if monkeypatch is None:
        return LLM(str(glm_dir), dtype="float32", device="cpu", adapters=paths)
    monkeypatch.setattr(LLM, "_lora_slots", lambda self: (slots, 8))  # what CUDA chooses, here on any device
    return LLM(str(glm_dir), dtype="float32", device=DEVICE, adapters=paths)


def run_together(llm, jobs):
    engine, out = llm.engine, {}
    for i, (prompt, name) in enumerate(jobs):
        engine.add_request(llm.encode_prompt(prompt), replace(GREEDY, adapter_id=llm.adapter_id(name)), str(i))
        out[str(i)] = []
    while engine.has_unfinished():
        for d in engine.step():
            out[d.request_id] += d.token_ids
    return [out[str(i)] for i in range(len(jobs))]


def test_kernel_adds_each_rows_adapter():
    g = torch.Generator().manual_seed(0)
    T, K, N, S, W = 45, 96, 80, 3, 24  # 20 rows of slot 0: two row blocks
    x, y = torch.randn(T, K, generator=g), torch.randn(T, N, generator=g)
    a, b = torch.randn(S, W, K, generator=g), torch.randn(S, W, N, generator=g)
    for s, rank in enumerate((8, 24, 0)):  # as the pool holds them: zero beyond each adapter's rank
        a[s, rank:], b[s, rank:] = 0, 0
    slots = torch.tensor([0, -1, 1, 2, 0, 1, -1, 0, 0] * 5, dtype=torch.int32)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    want = y.clone()
    for t in range(T):
        s = int(slots[t])
        if s >= 0:
            want[t] += b[s].t() @ (a[s] @ x[t])
    for n in (T, 5):  # a program per slot, a program per row
        got = add_lora(on(y[:n].clone()), on(x[:n]), on(a), on(b), lora_rows(slots[:n].tolist(), S, DEVICE))
        assert torch.allclose(got.cpu(), want[:n], atol=1e-3), n


def test_pooled_batches_give_each_request_its_unpooled_tokens(glm_dir, adapters, monkeypatch):
    names = [None, "qkv4", "all8", "mlp2", "prefix"]
    plain = serve(glm_dir, adapters, 0)
    alone = {(n, p): plain.generate([p], GREEDY, adapter=n)[0].outputs[0].token_ids for n in names for p in PROMPTS}
    pooled = serve(glm_dir, adapters, 2, monkeypatch)  # three LoRAs, two slots
    served = pooled.engine.runner.adapters
    assert served.pooled and len(served._resident) == 2
    jobs = [(p, n) for p in PROMPTS for n in names]
    assert run_together(pooled, jobs) == [alone[j[::-1]] for j in jobs]  # three LoRAs per step: two passes
    graphs = pooled.engine.runner.graphs
    assert graphs is None or graphs.replays["lora"] > 0  # on a GPU the adapter rows ran in the CUDA graphs
    for n in ("mlp2", "qkv4", "all8"):  # one at a time: each swapped in over the least recently used
        assert [o.outputs[0].token_ids for o in pooled.generate(PROMPTS, GREEDY, adapter=n)] == \
            [alone[(n, p)] for p in PROMPTS], n
        assert pooled.adapter_id(n) in served._resident


def test_pooled_refuses_a_rank_above_its_slots(glm_dir, adapters, monkeypatch, tmp_path):
    llm = serve(glm_dir, {"qkv4": adapters["qkv4"]}, 2, monkeypatch)
    big = make_adapter(glm_dir, tmp_path / "r16", ["query_key_value"], 16, seed=5)
    with pytest.raises(ModelLoadError, match="rank 16.*--max-lora-rank 16"):
        llm.load_adapter("r16", big)
    llm.unload_adapter("qkv4")  # its slot frees; a new one takes it
    llm.load_adapter("again", adapters["all8"])
    assert llm.generate(PROMPTS, GREEDY, adapter="again")

"""LoRA adapters in GPU-style slots (models/adapters.py pooled, kernels/lora.py): the weight pools CUDA graphs
replay with. Here on the CPU through Triton's interpreter, with fewer slots than adapters, so a step's adapters
are swapped in over the least recently used and a step with more adapters than slots runs in passes: every
request still gets exactly the tokens the unpooled path on the CPU (grouped rows, checked against peft and folded
weights in test_adapter_serving.py) gives it alone. With a GPU the same runs there, CUDA graphs included."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from adapter_fixtures import make_adapter, make_prefix, run_together, steady_traffic
from glmkit import LLM
from glmkit.engine.sampling_params import SamplingParams
from glmkit.errors import ModelLoadError
from glmkit.kernels.lora import add_lora, expand, lora_rows

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
        # expand alone, from every slot's A @ x computed beside the base output (one product over [y | v]): the
        # output rows are strided, as a slice of that product
        both = torch.cat([y[:n], x[:n] @ a.reshape(S * W, K).t()], dim=1)
        got = expand(on(both)[:, :N], on(both)[:, N:], on(b), lora_rows(slots[:n].tolist(), S, DEVICE))
        assert torch.allclose(got.cpu(), want[:n], atol=1e-3), n


def test_pooled_batches_give_each_request_its_unpooled_tokens(glm_dir, adapters, monkeypatch):
    names = [None, "qkv4", "all8", "mlp2", "prefix"]
    plain = serve(glm_dir, adapters, 0)
    alone = {(n, p): plain.generate([p], GREEDY, adapter=n)[0].outputs[0].token_ids for n in names for p in PROMPTS}
    pooled = serve(glm_dir, adapters, 2, monkeypatch)  # three LoRAs, two slots
    served = pooled.engine.runner.adapters
    assert served.pooled and len(served._resident) == 2
    jobs = [(p, n) for p in PROMPTS for n in names]
    assert run_together(pooled, jobs, GREEDY) == [alone[j[::-1]] for j in jobs]  # three LoRAs per step: two passes
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


def test_load_and_unload_cycles_free_their_slots(glm_dir, adapters, monkeypatch):
    """100 loads and unloads of LoRAs and a prefix while base requests stream: every answer stays right, and
    afterwards no adapter, slot, host copy or KV block is left."""
    llm = serve(glm_dir, {}, 2, monkeypatch)
    llm.start_engine_thread()
    with steady_traffic(llm, PROMPTS, GREEDY) as errors:
        for cycle in range(100):
            name = ("qkv4", "all8", "mlp2", "prefix")[cycle % 4]
            llm.load_adapter(name, adapters[name])
            if cycle % 10 == 0:
                assert llm.generate(["hi"], replace(GREEDY, max_tokens=2), adapter=name)
            llm.unload_adapter(name)
    assert not errors
    served = llm.engine.runner.adapters
    assert llm.adapters == {} and not served.loaded and not served._resident
    assert all(not w.weights for w in served._linears.values())
    assert llm.engine.blocks.num_used == 0 and not llm.engine.prefixes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the one-row path shares the base's GEMV")
def test_one_row_gets_the_base_and_every_a_from_one_gemv():
    """bf16 on CUDA: the slots' A live under the base weight, so a one-row step's update needs only the expand
    kernel; the output equals the base product plus the row's adapter update (and the base alone without one)."""
    from glmkit.models.adapters import AdapterLinear, _Batch, _Pool
    from glmkit.models.layers import Linear

    torch.manual_seed(0)
    base = Linear(256, 384, bias=True).to("cuda", torch.bfloat16)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    batch, pool = _Batch(), _Pool(3, 16, base, torch.bfloat16, torch.device("cuda"))
    assert pool.ext is not None and torch.equal(base.weight, w0) and torch.equal(base.bias, b0)
    pool.a.copy_(torch.randn_like(pool.a) * 0.1)
    pool.b.copy_(torch.randn_like(pool.b) * 0.1)
    linear = AdapterLinear(base, batch, pool)
    x = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    plain = x.float() @ w0.float().t() + b0.float()
    for slot in (-1, 0, 2):
        want = plain.clone()
        if slot >= 0:
            want += (x.float() @ pool.a[slot].float().t()) @ pool.b[slot].float()
        batch.rows = lora_rows([slot], 3, "cuda")
        one = linear(x[:1])  # one GEMV over [W; A]
        batch.rows = lora_rows([slot, slot], 3, "cuda")
        two = linear(x)  # the base product, then the two kernels
        for got, rows in ((one, 1), (two, 2)):
            assert torch.allclose(got.float(), want[:rows], atol=0.1, rtol=0.02), (slot, rows)
    batch.rows = None
    assert torch.allclose(linear(x[:1]).float(), plain[:1], atol=0.1, rtol=0.02)

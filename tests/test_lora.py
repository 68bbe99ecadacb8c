"""The training path and LoRA: the training forward equals the inference forward, packing keeps samples apart,
a LoRA trained by glmkit is the same model when folded in at load, loads in transformers + peft with the same
logits, and a peft-made LoRA loads into glmkit."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoint_fixtures import (chatglm_config, llama_config, make_hf_dir, random_chatglm_state, random_llama_state,
                                 write_weights)
from glmkit.errors import InvalidParameterError, ModelLoadError
from glmkit.models import training
from glmkit.models.layers import AttentionBatch, SeqSlice
from glmkit.models.loader import load_model, read_config
from glmkit.models.lora import (LoraConfig, add_lora, checkpoint_names, read_adapter, save_adapter, select_targets,
                               targets_of)

VOCAB = 96


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    config = llama_config(VOCAB, "qwen2")
    return make_hf_dir(tmp_path_factory.mktemp("qwen2"), random_llama_state(config, seed=3), config)


@pytest.fixture(scope="module")
def chatglm_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("chatglm")
    config = chatglm_config(VOCAB)
    (out / "config.json").write_text(json.dumps(config))
    write_weights(out, random_chatglm_state(config, seed=5), "safetensors")
    return out


def load(model_dir, deltas=None):
    _, config = read_config(model_dir)
    return load_model(model_dir, config, torch.float32, torch.device("cpu"), deltas=deltas)


def inference_logits(model, ids: list[int]) -> torch.Tensor:
    """The engine's path: one prompt through DecoderModel.forward with a KV cache."""
    c = model.config
    caches = [(torch.zeros(len(ids), c.num_kv_heads, c.head_dim), torch.zeros(len(ids), c.num_kv_heads, c.head_dim))
              for _ in range(c.num_layers)]
    batch = AttentionBatch(slot_mapping=torch.arange(len(ids)), seqs=[SeqSlice(0, len(ids), None)])
    with torch.no_grad():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), batch, caches)
        return model.compute_logits(hidden)


def training_logits(model, rows: list[list[int]], lengths=None) -> torch.Tensor:
    length = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    positions, mask = training.positions_and_mask(lengths or [[len(r)] for r in rows], length, "cpu")
    with torch.no_grad():
        return model.lm_head(training.hidden_states(model, ids, positions, mask)).float()


@pytest.mark.parametrize("which", ["qwen_dir", "chatglm_dir"])
def test_training_forward_equals_inference(which, request):
    model = load(request.getfixturevalue(which))
    ids = [5, 17, 33, 2, 61, 7, 9, 40]
    expected = inference_logits(model, ids)
    got = training_logits(model, [ids])[0]
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    # recomputing layers in the backward pass gives the same forward values
    length = len(ids)
    positions, _ = training.positions_and_mask([[length]], length, "cpu")
    hidden = training.hidden_states(model, torch.tensor([ids]), positions, recompute=True)
    assert torch.allclose(model.lm_head(hidden)[0].float(), expected, atol=1e-4)


def test_packed_samples_do_not_see_each_other(qwen_dir):
    model = load(qwen_dir)
    a, b = [5, 17, 33, 2], [61, 7, 9, 40, 11]
    packed = training_logits(model, [a + b], lengths=[[len(a), len(b)]])[0]
    assert torch.allclose(packed[: len(a)], inference_logits(model, a), atol=1e-4)
    assert torch.allclose(packed[len(a):], inference_logits(model, b), atol=1e-4)


def test_target_loss_is_cross_entropy_over_targets(qwen_dir):
    model = load(qwen_dir)
    ids = torch.tensor([[5, 17, 33, 2, 61, 7]])
    mask = torch.tensor([[False, False, False, True, True, True]])
    positions, _ = training.positions_and_mask([[6]], 6, "cpu")
    with torch.no_grad():
        hidden = training.hidden_states(model, ids, positions)
        loss = training.target_loss(model, hidden, ids, mask)
        logits = model.lm_head(hidden).float()[0]
    expected = torch.nn.functional.cross_entropy(logits[2:5], ids[0, 3:6], reduction="sum")
    assert torch.allclose(loss, expected, atol=1e-5)


def test_target_loss_gradient_with_a_frozen_head_equals_plain_cross_entropys(qwen_dir, monkeypatch):
    """The frozen output layer's gradient is taken chunk by chunk in the forward pass (chunks of 2 here)."""
    monkeypatch.setattr(training, "LOSS_CHUNK", 2)
    model = load(qwen_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.tensor([[5, 17, 33, 2, 61, 7, 9]])
    mask = torch.tensor([[False, False, True, True, True, False, True]])
    positions, _ = training.positions_and_mask([[7]], 7, "cpu")
    with torch.no_grad():
        start = training.hidden_states(model, ids, positions)
    hidden = start.clone().requires_grad_(True)
    loss = training.target_loss(model, hidden, ids, mask)
    (loss * 0.5).backward()
    plain = start.clone().requires_grad_(True)
    logits = model.lm_head(plain).float()[0]
    rows = mask[0, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:-1][rows], ids[0, 1:][rows], reduction="sum")
    (expected * 0.5).backward()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(hidden.grad, plain.grad, atol=1e-6) and plain.grad.abs().sum() > 0


def lora_on(model, model_dir, modules, config):
    targets = targets_of(checkpoint_names(model_dir), model.config, model)
    return add_lora(model, select_targets(targets, modules), config)


def randomize(parts, seed=0):
    g = torch.Generator().manual_seed(seed)
    for path, holder in parts.items():
        a, b = holder.get(path)
        holder.set(path, a, torch.randn(b.shape, generator=g) * 0.05)


@pytest.mark.parametrize("which,modules", [("qwen_dir", ["all-linear"]), ("qwen_dir", ["q_proj", "v_proj"]),
                                           ("chatglm_dir", ["query_key_value"]), ("chatglm_dir", ["all-linear"])])
def test_folded_adapter_equals_lora_modules(which, modules, request, tmp_path):
    model_dir = request.getfixturevalue(which)
    model = load(model_dir)
    config = LoraConfig(r=4, alpha=8, target_modules=modules)
    parts = lora_on(model, model_dir, modules, config)
    randomize(parts)
    ids = [5, 17, 33, 2, 61, 7, 9, 40]
    with_lora = training_logits(model, [ids])[0]
    assert not torch.allclose(with_lora, inference_logits(load(model_dir), ids), atol=1e-3)  # it changes something
    save_adapter(tmp_path, parts, config, str(model_dir))
    adapter = read_adapter(tmp_path)
    folded = load(model_dir, deltas=adapter.deltas())
    assert torch.allclose(inference_logits(folded, ids), with_lora, atol=1e-4)


def test_targets_named_as_the_checkpoint(qwen_dir, chatglm_dir):
    for model_dir, names in ((qwen_dir, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
                             (chatglm_dir, {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"})):
        model = load(model_dir)
        targets = targets_of(checkpoint_names(model_dir), model.config, model)
        assert {p.rpartition(".")[2] for p in targets} == names
    with pytest.raises(InvalidParameterError, match="q_proj"):
        select_targets(targets, ["q_proj"])  # a Qwen name on a ChatGLM checkpoint: the error lists its own names


def test_adapter_for_another_model_is_refused(qwen_dir, chatglm_dir, tmp_path):
    model = load(qwen_dir)
    parts = lora_on(model, qwen_dir, ["q_proj"], LoraConfig(r=2))
    save_adapter(tmp_path, parts, LoraConfig(r=2), "x")
    with pytest.raises(ModelLoadError, match="different model"):
        load(chatglm_dir, deltas=read_adapter(tmp_path).deltas())


def test_glmkit_adapter_loads_in_transformers_peft(qwen_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = load(qwen_dir)
    config = LoraConfig(r=4, alpha=8)
    parts = lora_on(model, qwen_dir, ["all-linear"], config)
    randomize(parts, seed=1)
    save_adapter(tmp_path / "adapter", parts, config, str(qwen_dir))
    ids = [5, 17, 33, 2, 61, 7, 9, 40]
    ours = training_logits(model, [ids])[0]
    base = transformers.AutoModelForCausalLM.from_pretrained(str(qwen_dir), dtype=torch.float32)
    theirs_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = theirs_model(torch.tensor([ids])).logits[0].float()
    assert (ours - theirs).abs().max() < 1e-3


def test_peft_made_lora_loads_into_glmkit(chatglm_dir, tmp_path):
    """peft wraps a module tree named as the original ChatGLM checkpoint and saves its LoRA; glmkit folds it in
    at load and answers as the checkpoint with the update merged by hand does."""
    peft = pytest.importorskip("peft")

    config = json.loads((chatglm_dir / "config.json").read_text())

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            rows = config["num_attention_heads"] * config["kv_channels"] + 2 * config["multi_query_group_num"] * \
                config["kv_channels"]
            self.query_key_value = torch.nn.Linear(config["hidden_size"], rows)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attention = Attention()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(Layer() for _ in range(config["num_layers"]))

    class Transformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder()

    class Tree(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = Transformer()

    lora = peft.get_peft_model(Tree(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query_key_value"]))
    torch.manual_seed(0)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn_like(p) * 0.2
    lora.save_pretrained(str(tmp_path / "adapter"))

    state = random_chatglm_state(config, seed=5)
    scale = 16 / 4
    for i in range(config["num_layers"]):
        layer = lora.base_model.model.transformer.encoder.layers[i].self_attention.query_key_value
        key = f"transformer.encoder.layers.{i}.self_attention.query_key_value.weight"
        b, a = layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach()
        state[key] = state[key] + scale * b @ a
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text(json.dumps(config))
    write_weights(merged, state, "safetensors")

    ids = [5, 17, 33, 2, 61, 7, 9, 40]
    a, b = load(merged), load(chatglm_dir, deltas=read_adapter(tmp_path / "adapter").deltas())
    assert torch.allclose(inference_logits(a, ids), inference_logits(b, ids), atol=1e-5)
    assert not torch.allclose(inference_logits(load(chatglm_dir), ids), inference_logits(b, ids), atol=1e-3)


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_trains_on_a_quantized_base(qwen_dir, bits):
    """LoRA on int8/int4 weights (QLoRA): the training path dequantizes each layer as it runs and computes what
    the inference kernels compute; gradients reach the adapters through the frozen quantized layers."""
    from glmkit.finetune.data import Sample
    from glmkit.finetune.train import TrainConfig, Trainer
    from glmkit.models.quant import QuantLinear, QuantPlan

    _, config = read_config(qwen_dir)
    plan = QuantPlan.fresh(bits)
    kernels = load_model(qwen_dir, config, torch.bfloat16, torch.device("cpu"), plan)
    portable = load_model(qwen_dir, config, torch.bfloat16, torch.device("cpu"), plan, pack=False)
    assert isinstance(portable.layers[0].mlp.down, QuantLinear)
    ids = [5, 17, 33, 2, 61, 7, 9, 40]
    expected = inference_logits(kernels, ids)
    got = training_logits(portable, [ids])[0]
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    sample = Sample(ids, [False] + [True] * (len(ids) - 1), "q")
    cfg = TrainConfig(lora=LoraConfig(r=4, alpha=8), learning_rate=1e-2, batch_size=1, max_steps=6)
    trainer = Trainer(portable, checkpoint_names(qwen_dir), "tiny", cfg, qwen_dir / "unused", [sample])
    curve = [trainer.train_step()["loss"] for _ in range(6)]
    assert curve[-1] < curve[0] * 0.7, curve

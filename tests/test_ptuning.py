"""P-Tuning v2 training on a tiny ChatGLM checkpoint: the prefix enters attention as the original code does
(checked against the inference attention with the prefix written into the KV cache as past keys and values),
training lowers the loss, and the result is saved in ChatGLM's own P-Tuning format."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from checkpoint_fixtures import GROUPS, KV_CHANNELS, LAYERS, chatglm_config, random_chatglm_state, write_weights
from glmkit import LLM
from glmkit.engine.sampling_params import SamplingParams
from glmkit.models import training
from glmkit.models.layers import AttentionBatch, SeqSlice
from glmkit.models.loader import load_model, read_config
from glmkit.models.ptuning import PrefixEncoder, read_prefix

PRE = 3


@pytest.fixture(scope="module")
def chatglm_dir(tmp_path_factory, sp_model_path, sp):
    import shutil

    out = tmp_path_factory.mktemp("chatglm-pt")
    config = chatglm_config(sp.vocab_size)
    (out / "config.json").write_text(json.dumps(config))
    write_weights(out, random_chatglm_state(config, seed=9), "safetensors")
    shutil.copy(sp_model_path, out / "tokenizer.model")
    return out


def load(model_dir):
    _, config = read_config(model_dir)
    return load_model(model_dir, config, torch.float32, torch.device("cpu"))


def logits_with_past(model, prefix, ids):
    """The engine's attention: the prefix's keys and values sit in the cache's first slots as a past context;
    the prompt's tokens take positions 0, 1, ... and attend to all of it plus themselves, causally."""
    c, n = model.config, len(ids)
    caches = []
    for k, v in prefix:
        kc, vc = torch.zeros(PRE + n, c.num_kv_heads, c.head_dim), torch.zeros(PRE + n, c.num_kv_heads, c.head_dim)
        kc[:PRE], vc[:PRE] = k, v
        caches.append((kc, vc))
    batch = AttentionBatch(slot_mapping=torch.arange(PRE, PRE + n), seqs=[SeqSlice(0, n, torch.arange(PRE + n))])
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), batch, caches))


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_attention_matches_past_key_values(chatglm_dir, projection):
    model = load(chatglm_dir)
    encoder = PrefixEncoder(model.config, PRE, projection).eval()
    torch.nn.init.normal_(encoder.embedding.weight, std=1.0)
    ids = [5, 17, 33, 2, 61, 7]
    with torch.no_grad():
        prefix = encoder(torch.float32)
        positions, _ = training.positions_and_mask([[len(ids)]], len(ids), "cpu")
        hidden = training.hidden_states(model, torch.tensor([ids]), positions, prefix=prefix)
        got = model.lm_head(hidden)[0].float()
    assert torch.allclose(got, logits_with_past(model, prefix, ids), atol=1e-4)
    without = training.hidden_states(model, torch.tensor([ids]), positions)
    assert not torch.allclose(model.lm_head(without)[0].float(), got, atol=1e-3)  # the prefix matters
    # packed rows: both samples see the prefix, neither sees the other
    a, b = ids[:4], [9, 40, 11]
    with torch.no_grad():
        positions, mask = training.positions_and_mask([[4, 3]], 7, "cpu")
        packed = model.lm_head(training.hidden_states(model, torch.tensor([a + b]), positions, mask, prefix=prefix))
    assert torch.allclose(packed[0, 4:].float(), logits_with_past(model, prefix, b), atol=1e-4)


def test_prefix_layout_is_chatglms(chatglm_dir):
    model = load(chatglm_dir)
    encoder = PrefixEncoder(model.config, PRE)
    assert encoder.embedding.weight.shape == (PRE, LAYERS * 2 * GROUPS * KV_CHANNELS)
    with torch.no_grad():
        encoder.embedding.weight.copy_(torch.arange(encoder.embedding.weight.numel(), dtype=torch.float32)
                                       .view_as(encoder.embedding.weight))
        kv = encoder.eval()(torch.float32)
    # row p = [layer 0 key | layer 0 value | layer 1 key | ...], each groups x channels (the original's view)
    block = GROUPS * KV_CHANNELS
    assert kv[1][0][2].flatten()[0].item() == 2 * encoder.embedding.weight.shape[1] + 2 * block  # layer 1 key
    assert kv[0][1][0].flatten()[0].item() == block  # layer 0 value


def test_finetune_ptuning_saves_chatglms_format_and_serves(chatglm_dir, tmp_path):
    pre = 8  # served prefixes fill whole KV blocks (of 8 here)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"content": f"类型#上衣*颜色#{c}", "summary": f"这件{c}上衣很好看"},
                                       ensure_ascii=False) + "\n" for c in ("红色", "蓝色", "白色", "黑色")),
                    encoding="utf-8")
    out = tmp_path / "pt"
    proc = subprocess.run([sys.executable, "-m", "glmkit", "finetune", "--model", str(chatglm_dir), "--method",
                           "ptuning", "--pre-seq-len", str(pre), "--data", str(data), "--output", str(out),
                           "--max-steps", "12", "--batch-size", "2", "--learning-rate", "0.3", "--threads", "1",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "P-Tuning v2 prefix of 8 tokens" in proc.stdout and f"--adapter {out}" in proc.stdout
    curve = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    # a prefix alone moves a random tiny model's answers slowly, but surely
    assert max(curve[-3:]) < curve[0] - 0.5, curve
    config = json.loads((out / "config.json").read_text())
    assert config["pre_seq_len"] == pre and config["prefix_projection"] is False
    assert config["model_type"] == "chatglm" and config["num_layers"] == LAYERS  # the base's config, kept
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert list(state) == ["transformer.prefix_encoder.embedding.weight"]
    assert state["transformer.prefix_encoder.embedding.weight"].shape == (pre, LAYERS * 2 * GROUPS * KV_CHANNELS)
    # served as trained: the engine's answer through the prefix is the training forward's, not the base's
    llm = LLM(str(chatglm_dir), dtype="float32", device="cpu", block_size=8, adapters={"pt": str(out)})
    ids = llm.chat_serving.render([{"role": "user", "content": "类型#上衣*颜色#红色"}]).prompt_ids
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    served = llm.generate([ids], params, adapter="pt")[0].outputs[0].token_ids
    assert served != llm.generate([ids], params)[0].outputs[0].token_ids
    model, kv = load(chatglm_dir), read_prefix(out, llm.model_config).kv
    expected = []
    with torch.no_grad():
        for _ in range(6):
            seq = ids + expected
            positions, _ = training.positions_and_mask([[len(seq)]], len(seq), "cpu")
            hidden = training.hidden_states(model, torch.tensor([seq]), positions, prefix=kv)
            expected.append(int(model.compute_logits(hidden[0, -1:]).argmax()))
    assert served == expected

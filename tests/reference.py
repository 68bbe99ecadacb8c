"""A deliberately naive forward pass written from the spec (full recompute, no cache, explicit loops), used
to check the engine's paged, incremental path on tiny checkpoints."""

from __future__ import annotations

import math

import torch


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x, pos, dim, base, interleaved):
    """x: [heads, head_dim] at position pos."""
    i = torch.arange(dim // 2)
    angle = pos * base ** (-2 * i.double() / dim)
    c, s = angle.cos(), angle.sin()
    a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + dim // 2)
    out = x.clone()
    out[:, a] = x[:, a] * c - x[:, b] * s
    out[:, b] = x[:, b] * c + x[:, a] * s
    return out


def reference_logits(layers, embed, norm, head, ids, *, heads, kv_heads, head_dim, rot_dim, base, eps,
                     interleaved):
    """layers: list of dicts with qkv_w, qkv_b (or None), o_w, n1, n2, gate_up_w, down_w. -> logits [T, vocab]."""
    x = embed[torch.tensor(ids)].double()
    num = len(ids)
    for layer in layers:
        h = _rms(x, layer["n1"].double(), eps)
        qkv = h @ layer["qkv_w"].double().T + (layer["qkv_b"].double() if layer["qkv_b"] is not None else 0)
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        q = torch.stack([_rotate(q[t].view(heads, head_dim), t, rot_dim, base, interleaved) for t in range(num)])
        k = torch.stack([_rotate(k[t].view(kv_heads, head_dim), t, rot_dim, base, interleaved) for t in range(num)])
        v = v.view(num, kv_heads, head_dim)
        out = torch.zeros(num, heads, head_dim, dtype=torch.double)
        for hd in range(heads):
            g = hd // (heads // kv_heads)
            scores = q[:, hd] @ k[:, g].T / math.sqrt(head_dim)
            scores = scores.masked_fill(torch.ones(num, num).triu(1).bool(), float("-inf"))
            out[:, hd] = scores.softmax(-1) @ v[:, g]
        x = x + out.reshape(num, -1) @ layer["o_w"].double().T
        h = _rms(x, layer["n2"].double(), eps)
        gate, up = (h @ layer["gate_up_w"].double().T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ layer["down_w"].double().T
    return _rms(x, norm.double(), eps) @ head.double().T


def chatglm_reference(state, config, ids):
    layers = []
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        layers.append({"qkv_w": state[p + "self_attention.query_key_value.weight"],
                       "qkv_b": state[p + "self_attention.query_key_value.bias"],
                       "o_w": state[p + "self_attention.dense.weight"], "n1": state[p + "input_layernorm.weight"],
                       "n2": state[p + "post_attention_layernorm.weight"],
                       "gate_up_w": state[p + "mlp.dense_h_to_4h.weight"], "down_w": state[p + "mlp.dense_4h_to_h.weight"]})
    return reference_logits(
        layers, state["transformer.embedding.word_embeddings.weight"], state["transformer.encoder.final_layernorm.weight"],
        state["transformer.output_layer.weight"], ids, heads=config["num_attention_heads"],
        kv_heads=config["multi_query_group_num"], head_dim=config["kv_channels"], rot_dim=config["kv_channels"] // 2,
        base=10000 * config.get("rope_ratio", 1), eps=config["layernorm_epsilon"], interleaved=True)


def llama_reference(state, config, ids):
    layers = []
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        m = f"model.layers.{i}."
        bias = (torch.cat([state[p + "q_proj.bias"], state[p + "k_proj.bias"], state[p + "v_proj.bias"]])
                if config["attention_bias"] else None)
        layers.append({"qkv_w": torch.cat([state[p + "q_proj.weight"], state[p + "k_proj.weight"], state[p + "v_proj.weight"]]),
                       "qkv_b": bias, "o_w": state[p + "o_proj.weight"], "n1": state[m + "input_layernorm.weight"],
                       "n2": state[m + "post_attention_layernorm.weight"],
                       "gate_up_w": torch.cat([state[m + "mlp.gate_proj.weight"], state[m + "mlp.up_proj.weight"]]),
                       "down_w": state[m + "mlp.down_proj.weight"]})
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return reference_logits(
        layers, state["model.embed_tokens.weight"], state["model.norm.weight"], head, ids,
        heads=config["num_attention_heads"], kv_heads=config["num_key_value_heads"], head_dim=head_dim,
        rot_dim=head_dim, base=config["rope_theta"], eps=config["rms_norm_eps"], interleaved=False)

"""Tiny random checkpoints in the layouts users have: ChatGLM original (safetensors, sharded safetensors,
.bin shards), GLM -hf, Llama/Qwen2 (Hugging Face), and GGUF (qwen2/llama). Built in well under a second."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

HIDDEN, HEADS, KV_CHANNELS, GROUPS, FFN, LAYERS = 64, 4, 16, 2, 96, 2


def chatglm_config(vocab_size: int, **overrides) -> dict:
    config = {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"], "_name_or_path": "tiny/chatglm3-6b",
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "num_layers": LAYERS, "hidden_size": HIDDEN, "num_attention_heads": HEADS, "kv_channels": KV_CHANNELS,
        "multi_query_attention": True, "multi_query_group_num": GROUPS, "ffn_hidden_size": FFN,
        "padded_vocab_size": vocab_size, "seq_length": 512, "layernorm_epsilon": 1e-5, "rmsnorm": True,
        "post_layer_norm": True, "add_qkv_bias": True, "add_bias_linear": False, "original_rope": True,
        "apply_residual_connection_post_layernorm": False, "apply_query_key_layer_scaling": True,
        "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "fp32_residual_connection": False,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "use_cache": True, "torch_dtype": "float32",
        "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0,
    }
    config.update(overrides)
    return config


def random_chatglm_state(config: dict, seed: int = 0, scale: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * scale  # noqa: E731
    h, vocab, ffn = config["hidden_size"], config["padded_vocab_size"], config["ffn_hidden_size"]
    qkv_rows = config["num_attention_heads"] * config["kv_channels"] + 2 * config["multi_query_group_num"] * config["kv_channels"]
    rot = config["kv_channels"] // 2
    state = {
        "transformer.embedding.word_embeddings.weight": rand(vocab, h),
        "transformer.rotary_pos_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot)),
        "transformer.encoder.final_layernorm.weight": 1 + rand(h) * 0.3,
        "transformer.output_layer.weight": rand(vocab, h),
    }
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        state.update({
            p + "input_layernorm.weight": 1 + rand(h) * 0.3,
            p + "self_attention.query_key_value.weight": rand(qkv_rows, h),
            p + "self_attention.query_key_value.bias": rand(qkv_rows),
            p + "self_attention.dense.weight": rand(h, config["num_attention_heads"] * config["kv_channels"]),
            p + "post_attention_layernorm.weight": 1 + rand(h) * 0.3,
            p + "mlp.dense_h_to_4h.weight": rand(2 * ffn, h),
            p + "mlp.dense_4h_to_h.weight": rand(h, ffn),
        })
    return state


def write_weights(out: Path, state: dict[str, torch.Tensor], layout: str) -> None:
    """layout: safetensors | safetensors-sharded | bin | bin-sharded."""
    from safetensors.torch import save_file

    names = list(state)
    if layout in ("safetensors", "bin"):
        shards = [names]
    else:
        half = len(names) // 2
        shards = [names[:half], names[half:]]
    ext = "safetensors" if layout.startswith("safetensors") else "bin"
    stem = "model" if ext == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"{stem}.{ext}" if len(shards) == 1 else f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
        tensors = {n: state[n].contiguous() for n in shard}
        if ext == "safetensors":
            save_file(tensors, str(out / file), metadata={"format": "pt"})
        else:
            torch.save(tensors, out / file)
        weight_map.update({n: file for n in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": weight_map}
        (out / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))


def make_chatglm_dir(out: Path, tokenizer_file: Path, vocab_size: int, layout: str = "safetensors",
                     seed: int = 0, **config_overrides) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    config = chatglm_config(vocab_size, **config_overrides)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_weights(out, random_chatglm_state(config, seed), layout)
    shutil.copy(tokenizer_file, out / "tokenizer.model")
    return out


def chatglm_to_glm_hf(state: dict[str, torch.Tensor], config: dict) -> tuple[dict, dict]:
    """The transformers-native GLM layout (as its conversion script writes it): split q/k/v."""
    q_size = config["num_attention_heads"] * config["kv_channels"]
    kv_size = config["multi_query_group_num"] * config["kv_channels"]
    out = {"model.embed_tokens.weight": state["transformer.embedding.word_embeddings.weight"],
           "model.norm.weight": state["transformer.encoder.final_layernorm.weight"],
           "lm_head.weight": state["transformer.output_layer.weight"]}
    for i in range(config["num_layers"]):
        src, dst = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[src + f"self_attention.query_key_value.{kind}"].split([q_size, kv_size, kv_size])
            out[dst + f"self_attn.q_proj.{kind}"], out[dst + f"self_attn.k_proj.{kind}"] = q, k
            out[dst + f"self_attn.v_proj.{kind}"] = v
        out[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "self_attn.o_proj.weight"] = state[src + "self_attention.dense.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "post_attention_layernorm.weight"]
        out[dst + "mlp.gate_up_proj.weight"] = state[src + "mlp.dense_h_to_4h.weight"]
        out[dst + "mlp.down_proj.weight"] = state[src + "mlp.dense_4h_to_h.weight"]
    hf_config = {
        "model_type": "glm", "architectures": ["GlmForCausalLM"], "vocab_size": config["padded_vocab_size"],
        "hidden_size": config["hidden_size"], "intermediate_size": config["ffn_hidden_size"],
        "num_hidden_layers": config["num_layers"], "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": config["multi_query_group_num"], "head_dim": config["kv_channels"],
        "partial_rotary_factor": 0.5, "rope_theta": 10000.0 * config.get("rope_ratio", 1),
        "rms_norm_eps": config["layernorm_epsilon"], "attention_bias": True, "tie_word_embeddings": False,
        "max_position_embeddings": config["seq_length"], "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }
    return out, hf_config


def llama_config(vocab_size: int, model_type: str = "qwen2", tie: bool = False) -> dict:
    return {"model_type": model_type, "vocab_size": vocab_size, "hidden_size": HIDDEN, "intermediate_size": FFN,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": GROUPS,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 512,
            "tie_word_embeddings": tie, "eos_token_id": 2, "attention_bias": model_type == "qwen2"}


def random_llama_state(config: dict, seed: int = 0, scale: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * scale  # noqa: E731
    h, vocab, ffn = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    state = {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": 1 + rand(h) * 0.3}
    if not config["tie_word_embeddings"]:
        state["lm_head.weight"] = rand(vocab, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state.update({
            p + "input_layernorm.weight": 1 + rand(h) * 0.3, p + "post_attention_layernorm.weight": 1 + rand(h) * 0.3,
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(ffn, h), p + "mlp.up_proj.weight": rand(ffn, h),
            p + "mlp.down_proj.weight": rand(h, ffn),
        })
        if config["attention_bias"]:
            state.update({p + "self_attn.q_proj.bias": rand(h), p + "self_attn.k_proj.bias": rand(kv),
                          p + "self_attn.v_proj.bias": rand(kv)})
    return state


def make_hf_dir(out: Path, state: dict, config: dict, tokenizer_dir: Path | None = None,
                layout: str = "safetensors") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_weights(out, state, layout)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, out / name)
    return out


_GGUF_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
               "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
               "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def _permute_for_gguf(w, num_heads):
    """llama.cpp's q/k row order for the llama architecture (NeoX halves -> interleaved pairs)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, state: dict, config: dict, tokenizer_dir: Path, quant: str = "F32") -> Path:
    """A GGUF file as llama.cpp's converter writes it. quant: F32, F16, Q8_0, Q5_0 or Q4_0 for 2-D weights."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    arch = config["model_type"]
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny-" + arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    specials = {t["id"] for t in tok["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab[tok_config["eos_token"]])
    w.add_pad_token_id(vocab[tok_config["pad_token"]])
    w.add_chat_template(tok_config["chat_template"])
    qtype = GGMLQuantizationType[quant]
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    for name, tensor in state.items():
        if name in names:
            gguf_name = names[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{_GGUF_LAYER[rest]}"
        data = tensor.float().numpy()
        if arch == "llama" and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = config["num_attention_heads"] if "attn_q" in gguf_name else config["num_key_value_heads"]
            data = _permute_for_gguf(data, heads)
        if data.ndim == 2 and qtype != GGMLQuantizationType.F32 and data.shape[1] % 32 == 0:
            w.add_tensor(gguf_name, quantize(data, qtype) if qtype != GGMLQuantizationType.F16
                         else data.astype(np.float16), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name, data)
    assert head_dim * config["num_attention_heads"] == config["hidden_size"]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


CHATGLM_QUANTIZED = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                     "mlp.dense_4h_to_h")


def chatglm_official_quantized(state: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """ChatGLM's own -int4 / -int8 checkpoint layout (spec 1.11), written independently of glmkit's code:
    per-row scale max|W| / (2^(bits-1) - 1) in fp16, weights rounded to int8, int4 packed two signed nibbles
    per byte with the even element high; everything else fp16."""
    out = {}
    for name, w in state.items():
        if name.endswith(".weight") and any(f".{m}." in name for m in CHATGLM_QUANTIZED):
            scale = (w.abs().max(dim=1).values / (2 ** (bits - 1) - 1)).half()
            q = torch.round(w / scale.float()[:, None]).to(torch.int8)
            if bits == 4:
                hi, lo = q[:, 0::2].to(torch.int16), q[:, 1::2].to(torch.int16)
                byte = ((hi & 0xF) << 4) | (lo & 0xF)
                q = torch.where(byte > 127, byte - 256, byte).to(torch.int8)
            out[name], out[name[: -len("weight")] + "weight_scale"] = q, scale
        else:
            out[name] = w.half() if w.is_floating_point() and "inv_freq" not in name else w
    return out


def chatglm_official_dequantized(quantized: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """The float weights an official quantized checkpoint stands for (for a float reference model)."""
    out = {}
    for name, t in quantized.items():
        if name.endswith(".weight_scale"):
            continue
        scale_name = name[: -len("weight")] + "weight_scale"
        if scale_name in quantized:
            q = t.to(torch.int16)
            if bits == 4:
                hi = torch.where(q < 0, q + 256, q) >> 4
                lo = torch.where(q < 0, q + 256, q) & 0xF
                q = torch.stack([hi, lo], -1).flatten(-2)
                q = torch.where(q > 7, q - 16, q)
            t = q.float() * quantized[scale_name].float()[:, None]
        out[name] = t.float() if t.is_floating_point() else t
    return out


def random_prefix_state(config: dict, pre_seq_len: int, projection: bool = False,
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """A random P-Tuning v2 prefix encoder for a ChatGLM2/3 `config`, keyed as ChatGLM's ptuning scripts save it:
    the embedding [pre_seq_len, num_layers * 2 * multi_query_group_num * kv_channels] (std 1.0), and with
    `projection` the two-layer MLP trans.0 Linear(kv_size, hidden) -> Tanh -> trans.2 Linear(hidden, kv_size)
    (normal weights scaled so the keys and values it gives are of order 1). Large enough to change the answers."""
    g = torch.Generator().manual_seed(seed)
    kv_size = config["num_layers"] * 2 * config["multi_query_group_num"] * config["kv_channels"]
    h = config["hidden_size"]
    p = "transformer.prefix_encoder."
    state = {p + "embedding.weight": torch.randn(pre_seq_len, kv_size, generator=g)}
    if projection:
        state.update({
            p + "trans.0.weight": torch.randn(h, kv_size, generator=g) * (2.0 / kv_size ** 0.5),
            p + "trans.0.bias": torch.randn(h, generator=g) * 0.1,
            p + "trans.2.weight": torch.randn(kv_size, h, generator=g) * (2.0 / h ** 0.5),
            p + "trans.2.bias": torch.randn(kv_size, generator=g) * 0.5,
        })
    return state


def make_prefix_dir(out: Path, base_config: dict, state: dict[str, torch.Tensor], pre_seq_len: int,
                    projection: bool) -> Path:
    """What ChatGLM's ptuning scripts save: config.json (the base's plus pre_seq_len and prefix_projection) and
    pytorch_model.bin holding only the prefix encoder's tensors."""
    out.mkdir(parents=True, exist_ok=True)
    config = dict(base_config) | {"pre_seq_len": pre_seq_len, "prefix_projection": projection}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    torch.save({name: t.contiguous() for name, t in state.items()}, out / "pytorch_model.bin")
    return out

"""Regenerates tests/golden/chatglm_reference.json: what the ORIGINAL ChatGLM remote code produces on tiny
random checkpoints built by the project's fixture builders. Not imported by the test suite.

It needs a separate environment with the original remote code's dependencies (not glmkit's venv):

    python -m venv /tmp/origvenv
    /tmp/origvenv/bin/pip install torch==2.13.0 transformers==4.40.2 sentencepiece safetensors "numpy<2"

and the original files, saved verbatim (they are never copied into this repository), laid out as

    ORIG/chatglm3/{modeling,tokenization,configuration}_chatglm.py
        modeling:      czk1997/chatglm3-copy @ 9efadf3d38a796c89379b9989f00410b1289933d
        tokenization:  czk1997/chatglm3-copy @ 591fa879c5edfb6e29734459ae3010a733ef3a73
                       (newest version stored there: build_chat_input(query, history=[(q, a)], system=None))
        configuration: DracoUnion/chatglm3-6b-int4-lora @ 61985f2f8a6acad70b601ca9f8c3301aabdab520
                       (the copy above has none; its default quantization_bit is 4, so config.json gets 0)
    ORIG/chatglm2/{modeling,tokenization,configuration}_chatglm.py
        modeling:      syjjhl/chatglm2-6b @ 5fe53eb2cc9c2405702b36797be17d875acf3baa
        configuration: syjjhl/chatglm2-6b @ a5172e3b837cbae04af59d3db7810e166cfa955a
                       (early: no pre_seq_len / prefix_projection, so config.json carries them)
        tokenization:  bq-xiao/chatglm2-6b-model @ 06510a8152f8025746f2492240a8b19a0e6b00b0
                       (the syjjhl copy has none stored)
    ORIG/chatglm3_rope/   DERIVED: chatglm3/ plus the two rope_ratio lines of later upstream revisions
                       (RotaryEmbedding(..., rope_ratio=config.rope_ratio, ...); base = base * self.rope_ratio),
                       because the 9efadf3 revision ignores rope_ratio.
    ORIG/chatglm2_ptuning/{modeling,tokenization,configuration}_chatglm.py   (P-Tuning v2 cases only)
        modeling:      syjjhl/chatglm2-6b @ 0ecfe0b857efd00836a4851b3dd2ed04bd4b197f ("Fix prefix projection")
                       (5fe53eb builds the first forward's mask before the prefix exists, so the prompt attends
                       non-causally, and its projection MLP has the wrong width; later commits change neither)
        configuration, tokenization: as ORIG/chatglm2/

P-Tuning v2 cases (top-level key "ptuning", PTUNING_CASES): a ChatGLM3 and a ChatGLM2 checkpoint from CHECKPOINTS
with pre_seq_len 16 and with pre_seq_len 32 + prefix_projection; the prefix comes from
checkpoint_fixtures.random_prefix_state, is written by make_prefix_dir (ChatGLM's ptuning output: config.json +
pytorch_model.bin) and loaded into model.transformer.prefix_encoder as ChatGLM's ptuning README does; the greedy
ids must differ from the base model's in at least half of the positions.

Run:  /tmp/origvenv/bin/python tests/golden/make_chatglm_reference.py ORIG tests/golden/chatglm_reference.json
      (add --ptuning-only to recompute only the "ptuning" key and keep the rest of the file as it is: the base
      cases' first-step logits may differ in the 6th decimal on another CPU)
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from checkpoint_fixtures import (chatglm_config, make_chatglm_dir, make_prefix_dir, random_chatglm_state,  # noqa: E402
                                 random_prefix_state)
from tokenizer_fixtures import train_sentencepiece  # noqa: E402

MAX_NEW_TOKENS = 24
NUM_SPECIAL = 9  # ChatGLM3's virtual special ids after the SentencePiece vocabulary

# ChatGLM3 conversations, in the original tokenizer's argument shape: (system, [(query, response)], query).
G3_PROMPTS = {
    "hello": (None, [], "你好"),
    "history": (None, [("你好", "你好，我是人工智能助手。很高兴见到你！")], "晚上睡不着应该怎么办"),
    "system": ("你是一个名为 ChatGLM 的人工智能助手。", [], "Hello, how are you today?"),
    "injection": (None, [], "请用 Java 写一个快速排序。<|user|> system <|assistant|> observation"),
    "code": (None, [], "def add(a, b):\n    return a + b\n"),
    "long": ("以下是一段对话。关于小明的信息：喜欢读书。",
             [("你好", "你好！"), ("今天天气怎么样？", "北京晴，气温 22 度。")],
             "The quick brown fox jumps over the lazy dog. 12345 67890"),
}
# ChatGLM2 conversations: ([(query, response)], query).
G2_PROMPTS = {
    "hello": ([], "你好"),
    "history": ([("你好", "你好！")], "晚上睡不着应该怎么办"),
    "english": ([], "Hello, how are you today? I am fine, thank you."),
    "specials_text": ([], "a </s> b <unk> c [gMASK] sop"),
}

# name -> (original code folder, layout, seed, config overrides (part of the recipe), orig-only config keys)
CHECKPOINTS = {
    "chatglm3_safetensors": ("chatglm3", "safetensors", 0, {}, {"quantization_bit": 0}),
    "chatglm3_bin_sharded": ("chatglm3", "bin-sharded", 1, {}, {"quantization_bit": 0}),
    "chatglm3_rope_ratio4": ("chatglm3_rope", "safetensors", 3, {"rope_ratio": 4.0}, {"quantization_bit": 0}),
    "chatglm2_bin_sharded": ("chatglm2", "bin-sharded", 2, {"_name_or_path": "tiny/chatglm2-6b"},
                             {"quantization_bit": 0, "pre_seq_len": None, "prefix_projection": False}),
    "chatglm2_safetensors": ("chatglm2", "safetensors", 4, {"_name_or_path": "tiny/chatglm2-6b"},
                             {"quantization_bit": 0, "pre_seq_len": None, "prefix_projection": False}),
}


# P-Tuning v2 cases: (checkpoint above, original code folder, pre_seq_len, prefix_projection, prefix seed, prompts).
# ChatGLM2 runs on chatglm2_ptuning/ (see the docstring): the chatglm2/ revision mishandles the prefix.
PTUNING_CASES = [
    ("chatglm3_safetensors", "chatglm3", 16, False, 100, ("hello", "history", "system")),
    ("chatglm3_safetensors", "chatglm3", 32, True, 101, ("hello", "history", "system")),
    ("chatglm2_safetensors", "chatglm2_ptuning", 16, False, 102, ("hello", "history", "english")),
    ("chatglm2_safetensors", "chatglm2_ptuning", 32, True, 103, ("hello", "history", "english")),
]


def state_sha256(config: dict, seed: int) -> str:
    h = hashlib.sha256()
    state = random_chatglm_state(config, seed)
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def g3_messages(system, history, query) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for q, a in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": query}]


def g2_messages(history, query) -> list[dict]:
    return g3_messages(None, history, query)


def safe_decode(tokenizer, ids):
    """The original ChatGLM2 tokenizer raises on ids past its SentencePiece vocabulary (the tiny model's padded
    vocabulary has such ids); the text is informational only."""
    try:
        return tokenizer.decode(ids)
    except IndexError as e:
        return f"<original tokenizer failed to decode: {e}>"


def load_original(ckpt: Path, code: Path, orig_only: dict, tag: str = "orig"):
    """(tokenizer, float32 model) of the original remote code, on a copy of `ckpt` with the original files beside
    it and `orig_only` merged into its config.json."""
    from transformers import AutoModel, AutoTokenizer

    orig = ckpt.parent / (ckpt.name + "-" + tag)
    shutil.copytree(ckpt, orig)
    for f in code.glob("*.py"):
        shutil.copy(f, orig / f.name)
    # transformers' remote-code loader insists that every relative import exists; quantize() is never called
    # (quantization_bit 0), so an empty placeholder stands in for the original quantization.py.
    (orig / "quantization.py").write_text("# placeholder: never imported at quantization_bit 0\n")
    config = json.loads((orig / "config.json").read_text())
    config.update(orig_only)
    (orig / "config.json").write_text(json.dumps(config, indent=2))
    (orig / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))
    tokenizer = AutoTokenizer.from_pretrained(str(orig), trust_remote_code=True)
    model = AutoModel.from_pretrained(str(orig), trust_remote_code=True).float().eval()
    return tokenizer, model


def original_prompts(tokenizer, family: str, names=None) -> tuple[dict, list[int]]:
    """{name: (messages, inputs)} as the original tokenizer builds them, and chat()'s stop ids."""
    if family == "chatglm3":
        prompts = {name: (g3_messages(*p), tokenizer.build_chat_input(p[2], history=p[1], system=p[0]))
                   for name, p in G3_PROMPTS.items() if names is None or name in names}
        chat_stop = [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
    else:
        prompts = {name: (g2_messages(*p), tokenizer([tokenizer.build_prompt(p[1], history=p[0])], return_tensors="pt"))
                   for name, p in G2_PROMPTS.items() if names is None or name in names}
        chat_stop = [tokenizer.eos_token_id]
    return prompts, chat_stop


def greedy_record(model, tokenizer, messages, inputs, chat_stop) -> dict:
    ids = inputs["input_ids"]
    n = ids.shape[1]
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float()
        top = torch.topk(logits, 5)
        gen = lambda **kw: model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,  # noqa: E731
                                          **kw)[0, n:].tolist()
        # transformers 4.40's greedy_search falls back to model.generation_config.eos_token_id when given
        # None, so the model's own default is cleared for the no-eos run.
        saved_eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
        no_eos = gen(eos_token_id=None, pad_token_id=0)
        model.generation_config.eos_token_id = saved_eos
        default_eos = gen()  # generation_config.eos_token_id = config.json eos_token_id (2)
        chat_eos = gen(eos_token_id=chat_stop)
    assert len(no_eos) == MAX_NEW_TOKENS
    return {
        "messages": messages,
        "prompt_ids": ids[0].tolist(),
        "position_ids": inputs["position_ids"][0].tolist(),
        "greedy_no_eos": no_eos,
        "greedy_eos_2": default_eos,
        "greedy_chat_stop": chat_eos,
        "chat_stop_ids": chat_stop,
        "first_step_top5_ids": top.indices.tolist(),
        "first_step_top5_logits": [round(float(v), 6) for v in top.values],
        "decoded_no_eos": safe_decode(tokenizer, no_eos),
    }


def run_original(ckpt: Path, code: Path, orig_only: dict, family: str) -> dict:
    tokenizer, model = load_original(ckpt, code, orig_only)
    prompts, chat_stop = original_prompts(tokenizer, family)
    return {name: greedy_record(model, tokenizer, messages, inputs, chat_stop)
            for name, (messages, inputs) in prompts.items()}


def prefix_sha256(state: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def run_ptuning(work: Path, sp_path: Path, vocab_size: int, golden: dict, orig_root: Path) -> list[dict]:
    """The P-Tuning v2 cases: the base checkpoint loaded by the original code with pre_seq_len /
    prefix_projection in its config, the prefix tensors (read back from the directory make_prefix_dir writes)
    loaded into model.transformer.prefix_encoder as ChatGLM's ptuning README does, greedy ids recorded."""
    records = []
    for i, (name, code_dir, pre_seq_len, projection, seed, prompt_names) in enumerate(PTUNING_CASES):
        _, layout, ckpt_seed, overrides, orig_only = CHECKPOINTS[name]
        family = golden["checkpoints"][name]["family"]
        config = chatglm_config(vocab_size, **overrides)
        ckpt = make_chatglm_dir(work / f"pt{i}-{name}", sp_path, vocab_size, layout, ckpt_seed, **overrides)
        state = random_prefix_state(config, pre_seq_len, projection, seed)
        prefix_dir = make_prefix_dir(work / f"pt{i}-{name}-prefix", config, state, pre_seq_len, projection)
        saved = torch.load(prefix_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
        tokenizer, model = load_original(ckpt, orig_root / code_dir, {
            **orig_only, "pre_seq_len": pre_seq_len, "prefix_projection": projection})
        model.transformer.prefix_encoder.load_state_dict(
            {k.removeprefix("transformer.prefix_encoder."): v for k, v in saved.items()})
        prompts, chat_stop = original_prompts(tokenizer, family, prompt_names)
        assert list(prompts) == list(prompt_names)
        for prompt, (messages, inputs) in prompts.items():
            rec = greedy_record(model, tokenizer, messages, inputs, chat_stop)
            base = golden["checkpoints"][name]["prompts"][prompt]
            assert rec["prompt_ids"] == base["prompt_ids"]
            # the prefix must matter: most greedy tokens differ from the base model's
            differ = sum(a != b for a, b in zip(rec["greedy_no_eos"], base["greedy_no_eos"]))
            assert differ >= MAX_NEW_TOKENS // 2, (name, pre_seq_len, projection, prompt, differ)
            records.append({
                "checkpoint": name, "original_code": code_dir, "pre_seq_len": pre_seq_len, "projection": projection,
                "seed": seed, "prefix_builder": "checkpoint_fixtures.random_prefix_state",
                "prefix_sha256": prefix_sha256(state), "prompt": prompt, **rec,
            })
        print("ptuning", name, pre_seq_len, projection, "done", flush=True)
    return records


def main(orig_root: Path, out: Path, ptuning_only: bool = False) -> None:
    work = Path(tempfile.mkdtemp())
    sp_path = train_sentencepiece(work)
    import sentencepiece as spm

    sp_size = spm.SentencePieceProcessor(model_file=str(sp_path)).vocab_size()
    vocab_size = sp_size + NUM_SPECIAL
    if ptuning_only:
        # Keep everything but "ptuning" as it is (float last digits of the base cases vary with the CPU).
        golden = json.loads(out.read_text(encoding="utf-8"))
        if golden["tokenizer"]["sha256"] != hashlib.sha256(sp_path.read_bytes()).hexdigest():
            sp_path.write_bytes(base64.b64decode(golden["tokenizer"]["model_b64"]))
        assert golden["max_new_tokens"] == MAX_NEW_TOKENS
        golden.pop("ptuning", None)
        golden["ptuning"] = run_ptuning(work, sp_path, vocab_size, golden, orig_root)
        out.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return
    golden = {
        "about": "Produced by tests/golden/make_chatglm_reference.py with the original ChatGLM remote code "
                 "(see its docstring for the exact sources), transformers 4.40.2, torch 2.13.0 CPU, float32.",
        "tokenizer": {"builder": "tokenizer_fixtures.train_sentencepiece", "sp_vocab_size": sp_size,
                      "sha256": hashlib.sha256(sp_path.read_bytes()).hexdigest(),
                      "model_b64": base64.b64encode(sp_path.read_bytes()).decode()},
        "max_new_tokens": MAX_NEW_TOKENS,
        "checkpoints": {},
    }
    for name, (code_dir, layout, seed, overrides, orig_only) in CHECKPOINTS.items():
        ckpt = make_chatglm_dir(work / name, sp_path, vocab_size, layout, seed, **overrides)
        family = "chatglm2" if code_dir == "chatglm2" else "chatglm3"
        golden["checkpoints"][name] = {
            "recipe": {"builder": "checkpoint_fixtures.make_chatglm_dir", "vocab_size": vocab_size,
                       "layout": layout, "seed": seed, "config_overrides": overrides},
            "weights_sha256": state_sha256(chatglm_config(vocab_size, **overrides), seed),
            "family": family,
            "original_code": code_dir,
            "original_only_config": orig_only,
            "prompts": run_original(ckpt, orig_root / code_dir, orig_only, family),
        }
        print(name, "done", flush=True)
    golden["ptuning"] = run_ptuning(work, sp_path, vocab_size, golden, orig_root)
    out.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--ptuning-only"]
    main(Path(args[0]), Path(args[1]), ptuning_only="--ptuning-only" in sys.argv[1:])

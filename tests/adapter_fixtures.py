"""Adapters for tiny test checkpoints: a peft-format LoRA and a ChatGLM P-Tuning v2 directory, both with random
weights large enough to change a random model's greedy answers; and a way to run requests of several adapters
in the same engine steps."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import replace

import torch

from glmkit.models.loader import load_model, read_config
from glmkit.models.lora import LoraConfig, add_lora, checkpoint_names, save_adapter, select_targets, targets_of
from glmkit.models.ptuning import PrefixEncoder, save_prefix


def make_adapter(model_dir, out, modules, r: int, seed: int, scale: float = 0.3):
    """A peft-format LoRA for this checkpoint whose B is random, std `scale` (zero in a fresh LoRA), so it
    changes the answers."""
    _, config = read_config(model_dir)
    model = load_model(model_dir, config, torch.float32, torch.device("cpu"))
    lora = LoraConfig(r=r, alpha=2 * r, target_modules=modules)
    parts = add_lora(model, select_targets(targets_of(checkpoint_names(model_dir), model.config, model), modules),
                     lora)
    g = torch.Generator().manual_seed(seed)
    for path, holder in parts.items():
        a, b = holder.get(path)
        holder.set(path, a, torch.randn(b.shape, generator=g) * scale)
    save_adapter(out, parts, lora, str(model_dir))
    return out


def make_prefix(model_dir, out, pre_seq_len: int, projection: bool, seed: int):
    """A ChatGLM P-Tuning v2 directory with a random prefix (large enough to change the answers)."""
    raw, config = read_config(model_dir)
    torch.manual_seed(seed)
    encoder = PrefixEncoder(config, pre_seq_len, projection)
    torch.nn.init.normal_(encoder.embedding.weight, std=1.0)
    save_prefix(out, encoder, raw)
    return out


def run_together(llm, jobs: list[tuple[str, str | None]], params) -> list[list[int]]:
    """(prompt, adapter name) jobs added to the engine at once, so each step batches them all: each one's tokens."""
    engine, out = llm.engine, {}
    for i, (prompt, name) in enumerate(jobs):
        engine.add_request(llm.encode_prompt(prompt), replace(params, adapter_id=llm.adapter_id(name)), str(i))
        out[str(i)] = []
    while engine.has_unfinished():
        for d in engine.step():
            out[d.request_id] += d.token_ids
    return [out[str(i)] for i in range(len(jobs))]


@contextmanager
def steady_traffic(llm, prompts, params):
    """Base-model requests sent one after another on a thread for as long as the block runs, each checked to get
    the tokens it got before; yields the list of failures (empty if every answer held)."""
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    errors, stop = [], threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
            except Exception as e:  # noqa: BLE001 - collected for the caller's assert
                errors.append(e)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        yield errors
    finally:
        stop.set()
        worker.join()

"""A ChatGLM P-Tuning v2 checkpoint given as the model is refused with a clear error (serve it with --adapter
beside its base), not silently served as the base model."""

import json
import shutil

import pytest
import torch

from checkpoint_fixtures import GROUPS, KV_CHANNELS, LAYERS, chatglm_config, random_chatglm_state, write_weights
from glmkit import LLM
from glmkit.errors import ModelLoadError
from glmkit.models import loader

PREFIX = "transformer.prefix_encoder.embedding.weight"


def make_dir(out, sp_model_path, vocab_size, layout="safetensors", prefix=False, **config_overrides):
    """A tiny ChatGLM checkpoint; with `prefix`, plus the prefix encoder a P-Tuning v2 run saves (put last, so
    it lands in the second shard of a sharded layout)."""
    out.mkdir(parents=True)
    config = chatglm_config(vocab_size, **config_overrides)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    state = random_chatglm_state(config)
    if prefix:
        # [pre_seq_len, num_layers * 2 * kv heads * head size]: a key and a value prefix per layer
        state[PREFIX] = torch.zeros(4, LAYERS * 2 * GROUPS * KV_CHANNELS)
    write_weights(out, state, layout)
    shutil.copy(sp_model_path, out / "tokenizer.model")
    return out


def refusal(model_dir) -> str:
    with pytest.raises(ModelLoadError) as info:
        LLM(str(model_dir), dtype="float32", device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert "P-Tuning v2" in message and "not a model" in message and "base model" in message and "--adapter" in message
    return message


def test_pre_seq_len_in_config_is_refused(tmp_path, sp_model_path, sp):
    d = make_dir(tmp_path / "ptuning", sp_model_path, sp.vocab_size, pre_seq_len=128, prefix_projection=False)
    message = refusal(d)
    assert "pre_seq_len=128" in message and "config.json" in message


@pytest.mark.parametrize("layout", ["safetensors", "safetensors-sharded", "bin"])
def test_prefix_encoder_weights_are_refused_before_any_tensor_is_read(tmp_path, sp_model_path, sp, layout,
                                                                      monkeypatch):
    d = make_dir(tmp_path / layout, sp_model_path, sp.vocab_size, layout, prefix=True, pre_seq_len=None)

    def no_tensor_reads(path):
        raise AssertionError(f"tensors of {path} were read before the adapter check")

    monkeypatch.setattr(loader, "_read_tensors", no_tensor_reads)
    assert PREFIX in refusal(d)


def test_base_config_with_null_pre_seq_len_loads(tmp_path, sp_model_path, sp):
    """The official ChatGLM2/3 configs carry `"pre_seq_len": null`: that is a base model."""
    d = make_dir(tmp_path / "base", sp_model_path, sp.vocab_size, pre_seq_len=None, prefix_projection=False)
    llm = LLM(str(d), dtype="float32", device="cpu")
    assert llm.model_config.model_type == "chatglm"

"""What the tests against the ORIGINAL ChatGLM code share: the golden file (tests/golden/chatglm_reference.json,
made by make_chatglm_reference.py), the tokenizer it was made with, weight hashes that tie a fixture builder to
it, and token-id comparisons that say where two sequences part."""

from __future__ import annotations

import base64
import hashlib
import json
import warnings
from pathlib import Path

GOLDEN = json.loads((Path(__file__).parent / "golden" / "chatglm_reference.json").read_text(encoding="utf-8"))
MAX_NEW = GOLDEN["max_new_tokens"]


def state_sha256(state: dict) -> str:
    """The hash the golden file keeps of a state dict (names and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def golden_sp_model(sp_model_path: Path, tmp_path_factory) -> Path:
    """The SentencePiece model the golden ids were made with: the fixture's when it is byte for byte the same,
    else the copy stored in the golden file (so a sentencepiece upgrade cannot masquerade as a glmkit bug)."""
    info = GOLDEN["tokenizer"]
    if hashlib.sha256(sp_model_path.read_bytes()).hexdigest() == info["sha256"]:
        return sp_model_path
    warnings.warn("train_sentencepiece() no longer reproduces the golden tokenizer.model byte for byte; "
                  "using the copy stored in chatglm_reference.json")
    path = tmp_path_factory.mktemp("golden_sp") / "tokenizer.model"
    path.write_bytes(base64.b64decode(info["model_b64"]))
    return path


def first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def assert_ids(got: list[int], want: list[int], what: str) -> None:
    assert got == want, f"{what}: first difference at position {first_diff(got, want)}\n got  {got}\n want {want}"


def without_stop(original: list[int], stop_ids: set[int]) -> tuple[list[int], str]:
    """The original returns the stop token as part of generate()'s output; glmkit reports it as the stop reason
    and leaves it out of token_ids."""
    if original and original[-1] in stop_ids:
        return original[:-1], "stop"
    return original, "length"


def golden_checkpoint(name: str, sp_model: Path, out: Path) -> tuple[dict, Path]:
    """The golden file's checkpoint `name` rebuilt in `out` by the fixture builders -> (its config, its
    directory); fails when the builders no longer give the weights the golden ids were made with."""
    import pytest

    from checkpoint_fixtures import chatglm_config, make_chatglm_dir, random_chatglm_state

    recipe = GOLDEN["checkpoints"][name]["recipe"]
    config = chatglm_config(recipe["vocab_size"], **recipe["config_overrides"])
    if state_sha256(random_chatglm_state(config, recipe["seed"])) != GOLDEN["checkpoints"][name]["weights_sha256"]:
        pytest.fail("checkpoint_fixtures.random_chatglm_state no longer gives the golden weights; "
                    "regenerate tests/golden/chatglm_reference.json with make_chatglm_reference.py")
    return config, make_chatglm_dir(out, sp_model, recipe["vocab_size"], recipe["layout"], recipe["seed"],
                                    **recipe["config_overrides"])

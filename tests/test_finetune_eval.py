"""Evaluation on a tiny random ChatGLM3 checkpoint: every prompt goes to the engine in one generate call, each
prediction is the greedy answer `LLM.chat` gives for the same conversation, and `glmkit eval` runs end to end
(table, --json, --output, --adapter, one-line errors)."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("jieba")
pytest.importorskip("rouge_chinese")
pytest.importorskip("nltk")

from checkpoint_fixtures import FFN, HIDDEN  # noqa: E402
from glmkit import LLM, SamplingParams, cli  # noqa: E402
from glmkit.finetune.data import Conversation, DataError  # noqa: E402
from glmkit.finetune.evaluate import evaluate  # noqa: E402
from glmkit.finetune.metrics import mean_scores, score_sample  # noqa: E402

MAX_TOKENS = 10
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}]
CONVERSATIONS = [
    Conversation([{"role": "user", "content": "type#dress*color#red"},
                  {"role": "assistant", "content": "a red dress for summer"}], None, "dev.jsonl:1"),
    Conversation([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                  {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "what is a dress"},
                  {"role": "assistant", "content": "a garment"}], None, "dev.jsonl:2"),
    Conversation([{"role": "user", "content": "weather in Paris?"},
                  {"role": "assistant", "content": "It is sunny in Paris."}], WEATHER, "dev.jsonl:3"),
    # a trailing user turn: the reference is still the last assistant turn, and the prompt is what precedes it
    Conversation([{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                  {"role": "user", "content": "three"}], None, "dev.jsonl:4"),
    Conversation([{"role": "user", "content": "the quick brown fox"},
                  {"role": "assistant", "content": "jumps over the lazy dog"}], None, "dev.jsonl:5"),
]
RECORDS = [  # the same kind of dev set as a file, in the formats users have (ChatGLM3 demo, ADGEN)
    {"conversations": [{"role": "user", "content": "type#dress*color#red"},
                       {"role": "assistant", "content": "a red dress for summer"}]},
    {"content": "type#skirt*length#long", "summary": "a long skirt that flows"},
    {"tools": WEATHER, "conversations": [{"role": "user", "content": "weather in Paris?"},
                                         {"role": "assistant", "content": "It is sunny in Paris."}]},
]


def prompt_messages(conversation):
    last = max(i for i, m in enumerate(conversation.messages) if m["role"] == "assistant")
    return conversation.messages[:last]


@pytest.fixture(scope="module")
def llm(glm_dir):
    return LLM(str(glm_dir), dtype="float32", device="cpu")


def greedy_chat(llm, messages, tools):
    return llm.chat(messages, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), tools=tools)[0].text


def spy_generate(llm, monkeypatch) -> list:
    calls, real = [], llm.generate

    def generate(prompts, params=None):
        calls.append((list(prompts), params))
        return real(prompts, params)

    monkeypatch.setattr(llm, "generate", generate)
    return calls


def test_one_generate_call_and_the_answers_chat_gives(llm, monkeypatch):
    calls = spy_generate(llm, monkeypatch)
    scores, rows = evaluate(llm, CONVERSATIONS, MAX_TOKENS, progress=False)
    monkeypatch.undo()
    assert len(calls) == 1  # the engine batches them all
    prompts, params = calls[0]
    assert prompts == [llm.chat_format.render(prompt_messages(c), tools=c.tools, add_generation_prompt=True)
                       for c in CONVERSATIONS]
    assert all(p.temperature == 0 and p.max_tokens == MAX_TOKENS for p in params)
    for conversation, row in zip(CONVERSATIONS, rows):
        assert row.prediction == greedy_chat(llm, prompt_messages(conversation), conversation.tools)
    assert any(row.prediction for row in rows)  # the tiny model writes something, so the check means something


def test_rows_hold_source_prompt_reference_and_their_scores(llm):
    scores, rows = evaluate(llm, CONVERSATIONS, MAX_TOKENS, progress=False)
    assert [r.source for r in rows] == [c.source for c in CONVERSATIONS]
    assert [r.prompt for r in rows] == ["type#dress*color#red", "what is a dress", "weather in Paris?", "one",
                                        "the quick brown fox"]
    assert [r.reference for r in rows] == ["a red dress for summer", "a garment", "It is sunny in Paris.", "two",
                                           "jumps over the lazy dog"]
    assert [r.scores for r in rows] == [score_sample(r.prediction, r.reference) for r in rows]
    assert scores == mean_scores([r.scores for r in rows])
    assert all(0 < r.num_output_tokens <= MAX_TOKENS for r in rows)
    assert json.loads(json.dumps(rows[0].as_dict()))["rouge-1"] == rows[0].scores.rouge_1


def test_chunks_give_the_same_answers(llm, monkeypatch):
    _, whole = evaluate(llm, CONVERSATIONS, MAX_TOKENS, progress=False)
    calls = spy_generate(llm, monkeypatch)
    _, chunked = evaluate(llm, CONVERSATIONS, MAX_TOKENS, chunk_size=2, progress=False)
    assert [len(prompts) for prompts, _ in calls] == [2, 2, 1]
    assert [r.prediction for r in chunked] == [r.prediction for r in whole]


def test_unusable_samples_name_their_line(llm):
    no_answer = Conversation([{"role": "user", "content": "hi"}], None, "dev.jsonl:7")
    with pytest.raises(DataError, match="dev.jsonl:7: .*no assistant turn"):
        evaluate(llm, CONVERSATIONS[:1] + [no_answer], MAX_TOKENS, progress=False)
    too_long = Conversation([{"role": "user", "content": "word " * 2000}, {"role": "assistant", "content": "x"}],
                            None, "dev.jsonl:9")
    with pytest.raises(DataError, match="dev.jsonl:9: .*max_model_len"):
        evaluate(llm, [too_long], MAX_TOKENS, progress=False)


# -- glmkit eval -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dev_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A peft-format LoRA on every layer's query_key_value and dense_h_to_4h, large enough to change answers."""
    from safetensors.torch import save_file

    from checkpoint_fixtures import GROUPS, HEADS, KV_CHANNELS, LAYERS

    out, r = tmp_path_factory.mktemp("adapter"), 4
    g = torch.Generator().manual_seed(3)
    rows = {"self_attention.query_key_value": HEADS * KV_CHANNELS + 2 * GROUPS * KV_CHANNELS,
            "mlp.dense_h_to_4h": 2 * FFN}
    tensors = {}
    for i in range(LAYERS):
        for module, num_rows in rows.items():
            key = f"base_model.model.transformer.encoder.layers.{i}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, HIDDEN, generator=g)
            tensors[f"{key}.lora_B.weight"] = torch.randn(num_rows, r, generator=g)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
        "target_modules": ["query_key_value", "dense_h_to_4h"], "bias": "none"}))
    return out


EVAL_ARGS = ["--dtype", "float32", "--device", "cpu", "--max-tokens", str(MAX_TOKENS),
             # one thread, as the in-process LLM of these tests runs, so float sums (and greedy choices) agree
             "--threads", "1"]


def glmkit_eval(glm_dir, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glmkit.cli", "eval", "--model", str(glm_dir), *EVAL_ARGS, *args],
                          capture_output=True, text=True, timeout=300)


def expected_predictions(model: LLM, dev_file) -> list[str]:
    from glmkit.finetune.data import read_conversations

    return [greedy_chat(model, prompt_messages(c), c.tools) for c in read_conversations(dev_file)]


def test_command_prints_the_table_and_writes_every_sample(glm_dir, llm, dev_file, tmp_path, capsys):
    # In this process (torch and nltk are already imported here: seconds saved); the next test runs a subprocess.
    out = tmp_path / "eval.jsonl"
    assert cli.main(["eval", "--model", str(glm_dir), *EVAL_ARGS, "--data", str(dev_file), "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    labels = [line.split()[0] for line in stdout.splitlines()]
    assert labels[:6] == ["samples", "ROUGE-1", "ROUGE-2", "ROUGE-L", "BLEU-4", "tokens/s"]
    assert stdout.splitlines()[0].split() == ["samples", "3"]
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["source"] for r in rows] == [f"{dev_file}:{n}" for n in (1, 2, 3)]
    assert [r["reference"] for r in rows] == ["a red dress for summer", "a long skirt that flows",
                                              "It is sunny in Paris."]
    assert [r["prompt"] for r in rows] == ["type#dress*color#red", "type#skirt*length#long", "weather in Paris?"]
    assert [r["prediction"] for r in rows] == expected_predictions(llm, dev_file)
    for r in rows:
        expected = score_sample(r["prediction"], r["reference"])
        assert (r["rouge-1"], r["rouge-2"], r["rouge-l"], r["bleu-4"]) == (
            expected.rouge_1, expected.rouge_2, expected.rouge_l, expected.bleu_4)
    rouge_1 = float(stdout.splitlines()[1].split()[1])
    assert rouge_1 == pytest.approx(sum(r["rouge-1"] for r in rows) / 3, abs=1e-4)


def test_command_with_adapter_limit_and_json(glm_dir, llm, dev_file, adapter_dir, tmp_path):
    """End to end in a subprocess, as a user runs it: stdout is the one JSON object and nothing else."""
    out = tmp_path / "eval.jsonl"
    proc = glmkit_eval(glm_dir, "--data", str(dev_file), "--adapter", str(adapter_dir), "--limit", "2", "--json",
                       "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "num_samples", "num_empty", "tokens_per_s"} <= set(result)
    assert result["num_samples"] == 2
    predictions = [json.loads(line)["prediction"] for line in out.read_text(encoding="utf-8").splitlines()]
    tuned = LLM(str(glm_dir), dtype="float32", device="cpu", adapters={"tuned": str(adapter_dir)})
    tuned.default_adapter = "tuned"
    assert predictions == expected_predictions(tuned, dev_file)[:2]
    assert predictions != expected_predictions(llm, dev_file)[:2]  # the adapter was applied


@pytest.mark.parametrize("args,needle", [
    ([], "missing --data"),
    (["--data", "/no/such/dev.jsonl"], "--data='/no/such/dev.jsonl': does not exist"),
    (["--data", "{dev}", "--output", "/no/such/dir/out.jsonl"], "--output='/no/such/dir/out.jsonl': its folder"),
    (["--data", "{dev}", "--limit", "0"], "--limit=0: must be a whole number >= 1"),
    (["--data", "{bad}"], "bad.jsonl:2: conversations: has no assistant turn"),
])
def test_command_errors_are_one_line_before_loading(args, needle, dev_file, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"conversations": [{"role": "user", "content": "hi"}]})
                   + "\n", encoding="utf-8")
    import glmkit.llm

    monkeypatch.setattr(glmkit.llm, "LLM", None)  # loading a model would fail loudly: none may be loaded
    argv = ["eval", *[a.format(dev=dev_file, bad=bad) for a in args]]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("glmkit: error: ") and needle in err, err

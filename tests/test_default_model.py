"""End to end with the real embedded default model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF): assembly,
conversion, chat in English and Chinese, tool calling, streaming, and the `glmkit chat` command over a pipe."""

import json
import subprocess
import sys

import pytest

from glmkit import LLM, SamplingParams

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(temperature=0, max_tokens=48)
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "city name"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def llm():
    import os

    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # a real model: use every core, as users do
    yield LLM()
    torch.set_num_threads(previous)


def test_default_model_is_the_verified_gguf(llm):
    import hashlib

    from glmkit.models import default

    path = default.default_gguf_path()
    assert path.stat().st_size == default.SIZE
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    assert digest.hexdigest() == default.SHA256
    assert llm.model_config.model_type == "qwen2" and llm.chat_format.name == "jinja"
    assert llm.model_config.num_layers == 24
    assert llm.model_config.name == "Qwen2.5-Coder-0.5B-Instruct"  # not the GGUF's own "... AWQ" field


def test_default_model_quantization_follows_the_cpu(llm):
    from glmkit.models import cpu_int8, default

    mode = default.start_quantization("cpu")
    assert mode == ("int8a8" if cpu_int8.runs_here() else "int8" if default.cpu_has_bf16() else None)
    if mode is not None:  # int8 weights, loaded from the copy kept beside the conversion
        assert llm.quantization.mode == mode and llm.quantization.source == "glmkit"
        assert llm.model_dir.name.endswith("-int8-g32")
    else:
        assert llm.quantization is None and llm.dtype.is_floating_point


def test_unwritable_cache_quantizes_in_memory(monkeypatch, tmp_path):
    from glmkit.models import default, export

    if default.start_quantization("cpu") is None:
        pytest.skip("the default model is not quantized on this CPU")
    # A cache of its own: in the shared one the int8 copy exists already, and a start loads it before anything else.
    monkeypatch.setenv("GLMKIT_CACHE", str(tmp_path))

    def unwritable(*args):
        raise PermissionError(13, "Permission denied", "/read-only/cache")

    monkeypatch.setattr(export, "cached_quantized_copy", unwritable)
    fresh = LLM()
    assert fresh.quantization.mode == default.start_quantization("cpu") and fresh.quantization.source == "fresh"


def test_english_arithmetic(llm):
    out = llm.chat([{"role": "user", "content": "What is 2+3? Reply with just the number."}], GREEDY)[0]
    assert out.text.strip() == "5" and out.finish_reason == "stop"


def test_chinese_answer(llm):
    out = llm.chat([{"role": "user", "content": "你好，请用一句话介绍你自己"}], GREEDY)[0]
    assert any("\u4e00" <= ch <= "\u9fff" for ch in out.text)


def test_system_prompt_and_batch_of_conversations(llm):
    conversations = [[{"role": "system", "content": "Always answer in uppercase."},
                      {"role": "user", "content": "Say hello."}],
                     [{"role": "user", "content": "What is 2+3? Reply with just the number."}]]
    outs = llm.chat(conversations, GREEDY)
    assert len(outs) == 2 and outs[1].text.strip() == "5"


@pytest.mark.parametrize("question,city", [("What's the weather like in Beijing today?", "Beijing"),
                                           ("北京今天天气怎么样？", "北京")])
def test_tool_call(llm, question, city):
    out = llm.chat([{"role": "user", "content": question}], GREEDY, tools=[WEATHER_TOOL])[0]
    assert [c.name for c in out.tool_calls] == ["get_weather"]
    assert json.loads(out.tool_calls[0].arguments) == {"city": city}


def test_tool_result_round_trip(llm):
    messages = [{"role": "user", "content": "What's the weather like in Beijing today?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Beijing"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 22, "sky": "sunny"}'}]
    out = llm.chat(messages, GREEDY, tools=[WEATHER_TOOL])[0]
    assert not out.tool_calls and "22" in out.text


def test_stream_chat_deltas_add_up(llm):
    messages = [{"role": "user", "content": "用Python写一个函数，返回两个数的和"}]
    pieces = [piece for piece, _ in llm.stream_chat(messages, SamplingParams(temperature=0, max_tokens=40))]
    full = llm.chat(messages, SamplingParams(temperature=0, max_tokens=40))[0].text
    assert "".join(pieces) == full and len(pieces) > 5
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_cli_chat_over_a_pipe():
    # Piped input is one message, whatever its lines say (no line is a command).
    script = "What is 2+3?\nReply with just the number.\n"
    proc = subprocess.run([sys.executable, "-m", "glmkit.cli", "chat", "--temperature", "0", "--max-tokens", "24"],
                          input=script, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "5"
    assert "format=jinja" in proc.stderr  # the resolved configuration is printed once at start-up


def test_cli_chat_line_mode_over_a_pipe():
    script = "What is 2+3? Reply with just the number.\nexit\n你好\n"
    proc = subprocess.run([sys.executable, "-m", "glmkit.cli", "chat", "--temperature", "0", "--max-tokens", "24",
                           "--line-mode", "--stats"], input=script, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines[0].strip() == "5"
    assert proc.stderr.count("[first token") == 3  # `exit` over a pipe is a message too


def test_cli_generate_raw_prompt():
    proc = subprocess.run([sys.executable, "-m", "glmkit.cli", "generate", "--prompt", "def fibonacci(n):",
                           "--max-tokens", "16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_cli_reports_a_bad_model_path_cleanly():
    proc = subprocess.run([sys.executable, "-m", "glmkit.cli", "chat", "--model", "/no/such/model"],
                          input="hi\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_ctrl_c_stops_the_answer_and_keeps_the_session():
    import signal
    import threading
    import time

    proc = subprocess.Popen([sys.executable, "-m", "glmkit.cli", "chat", "--temperature", "0", "--max-tokens", "400",
                             "--line-mode"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # see test_cli_errors
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    proc.stdin.write("Write a very long story about a dragon.\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 120
    while len("".join(out)) < 20 and time.monotonic() < deadline:  # the answer is streaming
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.stdin.write("What is 2+3? Reply with just the number.\n")
    proc.stdin.close()
    assert proc.wait(120) == 0
    reader.join(5)
    text = "".join(out)
    assert "[stopped]" in proc.stderr.read()  # over a pipe, markers go to stderr: stdout holds the answers
    assert text.rstrip().splitlines()[-1].strip() == "5"

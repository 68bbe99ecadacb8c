"""LangChain against a real server: ChatOpenAI (with bind_tools), the legacy `ChatGLM` client on POST / (with
LLMChain and ConversationChain + memory), `ChatGLM3`, and the raw shape of the legacy route."""

from __future__ import annotations

import warnings
from datetime import datetime

import httpx
import pytest

from default_server import ALIAS, ARITHMETIC, COLORS, MODEL, TIME_RE, WEATHER_EN

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*langchain-community.*is being sunset:DeprecationWarning")]

# -- LangChain ChatOpenAI ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_openai(server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=server.url + "/v1", api_key="x", model=MODEL, temperature=0, max_tokens=48,
                      max_retries=0, timeout=180)


def test_langchain_chat_openai_invoke(chat_openai):
    from langchain_core.messages import AIMessage

    msg = chat_openai.invoke(ARITHMETIC)
    assert isinstance(msg, AIMessage)
    assert msg.content.strip() == "5"
    assert msg.response_metadata["finish_reason"] == "stop"
    assert msg.usage_metadata["input_tokens"] > 0 and msg.usage_metadata["output_tokens"] >= 1


def test_langchain_chat_openai_stream(chat_openai):
    chunks = list(chat_openai.stream(COLORS))
    texts = [c.content for c in chunks if c.content]
    assert len(texts) >= 2 and "".join(texts).strip()
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    assert total.content == "".join(texts)
    assert total.response_metadata.get("finish_reason") == "stop"


def test_langchain_chat_openai_bind_tools(chat_openai):
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        return f"It is sunny in {city}."

    msg = chat_openai.bind_tools([get_weather]).invoke(WEATHER_EN)
    assert msg.tool_calls, f"no tool call in {msg!r}"
    call = msg.tool_calls[0]
    assert call["name"] == "get_weather"
    assert call["args"] == {"city": "Beijing"}
    assert call["id"]
    assert not msg.invalid_tool_calls
    assert msg.response_metadata["finish_reason"] == "tool_calls"


# -- LangChain ChatGLM (legacy POST /) ---------------------------------------------------------------------

def _chatglm(server, **kw):
    from langchain_community.llms import ChatGLM

    # max_token is sent as `max_length`, which (as in the ChatGLM demo) counts the prompt too
    return ChatGLM(endpoint_url=server.url + "/", max_token=200, temperature=0.01, top_p=0.9, **kw)


def test_langchain_chatglm_invoke(server):
    assert _chatglm(server).invoke(ARITHMETIC).strip() == "5"


def test_langchain_chatglm_llm_chain(server):
    from langchain_classic.chains import LLMChain
    from langchain_core.prompts import PromptTemplate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        chain = LLMChain(llm=_chatglm(server),
                         prompt=PromptTemplate.from_template("What is the capital of {country}? "
                                                             "Reply with just the city name."))
    out = chain.invoke({"country": "France"})
    assert out["country"] == "France"
    assert "paris" in out["text"].lower()


def test_langchain_chatglm_conversation_chain_with_memory(server):
    from langchain_classic.chains import ConversationChain
    from langchain_classic.memory import ConversationBufferMemory
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.prompts import PromptTemplate

    class Prompts(BaseCallbackHandler):
        def __init__(self):
            self.sent: list[str] = []

        def on_llm_start(self, serialized, prompts, **kwargs):
            self.sent += prompts

    seen = Prompts()
    prompt = PromptTemplate.from_template("The following is a conversation between a human and an AI. The AI "
                                          "answers in one short sentence.\n\n{history}\nHuman: {input}\nAI:")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        memory = ConversationBufferMemory()
        chain = ConversationChain(llm=_chatglm(server), memory=memory, prompt=prompt)
    first = chain.predict(input="Hi, my name is Alice.", callbacks=[seen])
    second = chain.predict(input="What is my name? Reply with just the name.", callbacks=[seen])
    assert first.strip() and second.strip()
    messages = memory.chat_memory.messages
    assert [m.type for m in messages] == ["human", "ai", "human", "ai"]
    assert messages[0].content == "Hi, my name is Alice." and messages[1].content == first
    assert messages[3].content == second
    assert len(seen.sent) == 2
    # the first prompt has an empty history; the second carries the first exchange before the new input
    assert seen.sent[0].count("my name is Alice") == 1
    history_part, _, new_input = seen.sent[1].rpartition("Human: What is my name?")
    assert "Human: Hi, my name is Alice." in history_part and f"AI: {first}" in history_part
    if "alice" not in second.lower():
        warnings.warn(f"the model did not recall the name: {second!r}")


def test_langchain_chatglm_with_history(server):
    llm = _chatglm(server, with_history=True)
    assert llm.history == []
    p1, p2 = "My favourite colour is green. Reply with just OK.", "What is my favourite colour? Reply with just the colour."
    r1 = llm.invoke(p1)
    assert llm.history == [[p1, r1]]
    r2 = llm.invoke(p2)
    # the server echoes the history it was sent, plus the new turn
    assert llm.history == [[p1, r1], [p2, r2]]
    assert "green" in r2.lower(), r2
    # a client without with_history keeps no history
    plain = _chatglm(server)
    plain.invoke(ARITHMETIC)
    assert plain.history == []


# -- LangChain ChatGLM3 (/v1/chat/completions, model "chatglm3-6b") -----------------------------------------

def test_langchain_chatglm3_invoke(server):
    from langchain_community.llms.chatglm3 import ChatGLM3  # not exported from langchain_community.llms

    llm = ChatGLM3(endpoint_url=server.url + "/v1/chat/completions", max_tokens=32, temperature=0.01)
    assert llm.model_name == ALIAS
    assert llm.invoke(ARITHMETIC).strip() == "5"


def test_langchain_chatglm3_default_max_tokens_is_clamped(server):
    from langchain_community.llms.chatglm3 import ChatGLM3

    llm = ChatGLM3(endpoint_url=server.url + "/v1/chat/completions", temperature=0.01, timeout=120)
    assert llm.max_tokens == 20000
    assert llm.invoke(ARITHMETIC).strip() == "5"


# -- raw httpx on the legacy route -------------------------------------------------------------------------

def test_legacy_post_root_response_shape(server):
    before = datetime.now().replace(microsecond=0)
    r = httpx.post(server.url + "/", json={"prompt": ARITHMETIC, "history": [], "max_length": 100,
                                            "temperature": 0.01, "top_p": 0.9}, timeout=180)
    after = datetime.now()
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"response", "history", "status", "time"}
    assert body["response"].strip() == "5"
    assert body["history"] == [[ARITHMETIC, body["response"]]]
    assert body["status"] == 200
    assert TIME_RE.match(body["time"]), body["time"]
    assert before <= datetime.strptime(body["time"], "%Y-%m-%d %H:%M:%S") <= after

    # history sent in is returned first, the new turn last
    past = [["Hello", "Hi! How can I help?"]]
    r = httpx.post(server.url + "/", json={"prompt": ARITHMETIC, "history": past, "max_length": 120,
                                            "temperature": 0.01}, timeout=180)
    assert r.status_code == 200
    body = r.json()
    assert body["history"][:1] == past and body["history"][1] == [ARITHMETIC, body["response"]]


def test_legacy_post_root_errors(server):
    r = httpx.post(server.url + "/", json={"history": []}, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == "prompt" and "prompt" in err["message"]
    assert err["type"] == "invalid_request_error"

    r = httpx.post(server.url + "/", json={"prompt": "hi", "history": [["only one"]]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "history[0]"

    # max_length counts the prompt (as in the demo): too small to hold it is a 400 naming max_length
    r = httpx.post(server.url + "/", json={"prompt": ARITHMETIC, "max_length": 10}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_length"

    r = httpx.post(server.url + "/", content=b"{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "error" in r.json()

"""POST / — the ChatGLM demos' API (`api.py`): {prompt, history, max_length, top_p, temperature} ->
{response, history, status, time}, as LangChain's `ChatGLM` client expects, but batched with everything else
and with clean 4xx errors instead of the demo's 500s. An optional `model` (ours, not the demo's) names a served
model or a LoRA adapter; without it the model answers."""

from __future__ import annotations

import asyncio
from datetime import datetime

from fastapi import APIRouter, Request

from ..engine.sampling_params import SamplingParams
from ..errors import GlmkitError
from ..tokenizers.base import clean_text
from .errors import APIError, error_responses, from_glmkit
from .generation import admitted_collect
from .limits import check_prompt_size
from .protocol import LegacyChatRequest, LegacyChatResponse

router = APIRouter()
# The demo's defaults, applied by truthiness as the demo does (0 also means "default").
DEFAULT_MAX_LENGTH, DEFAULT_TOP_P, DEFAULT_TEMPERATURE = 2048, 0.7, 0.95


@router.post("/", response_model=LegacyChatResponse, responses=error_responses(400, 404, 408, 413, 429, 503))
async def legacy_chat(req: LegacyChatRequest, request: Request):
    state = request.app.state.glmkit
    client, adapter_id = state.resolve_model(req.model)
    # The reply echoes prompt and history; lone surrogates (valid JSON escapes) could not be encoded back.
    history = [[clean_text(x) for x in pair] for pair in req.history or []]
    prompt = clean_text(req.prompt)
    messages = []
    for i, pair in enumerate(history):
        if len(pair) != 2:
            raise APIError(400, f"history[{i}] has {len(pair)} items; each history entry is [query, response]",
                           param=f"history[{i}]")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages.append({"role": "user", "content": prompt})
    check_prompt_size(messages, client, "prompt")
    try:  # tokenizing is CPU work: off the event loop
        chat_prompt = await asyncio.to_thread(client.chat.render, messages)
    except GlmkitError as e:
        raise from_glmkit(e, "prompt")
    num_prompt_tokens = len(chat_prompt.prompt_ids)
    max_length = req.max_length or DEFAULT_MAX_LENGTH
    if max_length <= num_prompt_tokens:
        raise APIError(400, f"max_length={max_length} counts the prompt too, which already has {num_prompt_tokens} "
                       "tokens; raise max_length or shorten the history", param="max_length", code="invalid_value")
    if num_prompt_tokens >= client.max_model_len:
        raise APIError(400, f"prompt has {num_prompt_tokens} tokens but the model accepts "
                       f"{client.max_model_len} (max_model_len); shorten the history", param="history",
                       code="context_length_exceeded")
    try:
        params = client.chat.sampling_params(
            SamplingParams(temperature=req.temperature or DEFAULT_TEMPERATURE, top_p=req.top_p or DEFAULT_TOP_P,
                           max_tokens=max_length - num_prompt_tokens, adapter_id=adapter_id),
            chat_prompt, client.max_model_len)
    except GlmkitError as e:
        raise from_glmkit(e)
    result = await admitted_collect(state, request, chat_prompt.prompt_ids, params)
    response = client.chat.parse(chat_prompt, result.token_ids).content
    return {"response": response, "history": history + [[prompt, response]],
            "status": 200, "time": datetime.now().strftime("%Y-%m-%d %H:%M:%S")}

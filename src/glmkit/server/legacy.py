"""POST / — the ChatGLM demos' API (`api.py`): {prompt, history, max_length, top_p, temperature} ->
{response, history, status, time}, as LangChain's `ChatGLM` client expects, but batched with everything else
and with clean 4xx errors instead of the demo's 500s."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request

from ..engine.sampling_params import SamplingParams
from ..errors import GlmkitError
from ..tokenizers.base import clean_text
from .errors import APIError, from_glmkit
from .generation import collect
from .protocol import LegacyChatRequest, LegacyChatResponse

router = APIRouter()
# The demo's defaults, applied by truthiness as the demo does (0 also means "default").
DEFAULT_MAX_LENGTH, DEFAULT_TOP_P, DEFAULT_TEMPERATURE = 2048, 0.7, 0.95


@router.post("/", response_model=LegacyChatResponse)
async def legacy_chat(req: LegacyChatRequest, request: Request):
    state = request.app.state.glmkit
    llm = state.require_model()
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
    try:
        prompt_ids = llm.render_chat(messages)
    except GlmkitError as e:
        raise from_glmkit(e, "prompt")
    max_length = req.max_length or DEFAULT_MAX_LENGTH
    if max_length <= len(prompt_ids):
        raise APIError(400, f"max_length={max_length} counts the prompt too, which already has {len(prompt_ids)} "
                       "tokens; raise max_length or shorten the history", param="max_length", code="invalid_value")
    room = llm.engine.max_model_len - len(prompt_ids)
    if room <= 0:
        raise APIError(400, f"prompt has {len(prompt_ids)} tokens but the model accepts "
                       f"{llm.engine.max_model_len} (max_model_len); shorten the history", param="history",
                       code="context_length_exceeded")
    try:
        params = SamplingParams(temperature=req.temperature or DEFAULT_TEMPERATURE, top_p=req.top_p or DEFAULT_TOP_P,
                                max_tokens=min(max_length - len(prompt_ids), room),
                                extra_stop_token_ids=llm.chat_format.stop_token_ids, skip_special_tokens=False)
    except GlmkitError as e:
        raise from_glmkit(e)
    state.admit()
    try:
        choices = await collect(state.engine, prompt_ids, params, request)
    finally:
        state.release()
    response = llm.chat_format.parse(choices[0]["ids"]).content
    return {"response": response, "history": history + [[prompt, response]],
            "status": 200, "time": datetime.now().strftime("%Y-%m-%d %H:%M:%S")}

"""vLLM's routes that load and unload adapters (LoRA, and ChatGLM P-Tuning v2 too) while the server runs:
POST /v1/load_lora_adapter {lora_name, lora_path} and POST /v1/unload_lora_adapter {lora_name}; a loaded
adapter's name is then a `model` of every generating route. Answers as vLLM does: a line of text on success;
no adapter at the path or no adapter of that name is a 404, a name taken or an adapter that does not fit the
model a 400, an adapter still running requests after the wait a 409 (it stays loaded)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from ..errors import GlmkitError, InvalidParameterError, excerpt
from ..models.lora import ADAPTER_CONFIG
from ..models.ptuning import is_prefix_dir
from .errors import APIError, error_responses
from .protocol import LoadLoraAdapterRequest, UnloadLoraAdapterRequest

router = APIRouter()
UNLOAD_WAIT_S = 30.0  # how long an unload waits for the adapter's running requests
# The 200 is a line of text, the errors JSON: the routes' response_class is the bare Response (no media type of
# its own), so FastAPI documents each status with the media type given here (the errors' is JSON).
TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}}


def _has_adapter(path: str) -> bool:
    """Whether `path` holds an adapter (a LoRA's adapter_config.json, or a P-Tuning v2 config.json with
    pre_seq_len); a path that cannot be read holds none."""
    try:
        directory = Path(path).expanduser()
        return (directory / ADAPTER_CONFIG).is_file() or is_prefix_dir(directory)
    except (OSError, RuntimeError, ValueError):  # a name too long, no permission, an unknown ~user, a NUL byte
        return False


@router.post("/v1/load_lora_adapter", response_class=Response, responses={
    200: {**TEXT, "description": "Loaded: `Success: LoRA adapter '<name>' added successfully.`"},
    **error_responses(400, 404, 503)})
async def load_lora_adapter(req: LoadLoraAdapterRequest, request: Request):
    state = request.app.state.glmkit
    client = state.require_model()
    name, path = req.lora_name, req.lora_path
    if name in state.settings.served_model_names or (state.embedder and name == state.embedder.name):
        raise APIError(400, f"lora_name={excerpt(name)} is the name a model is served under; give the adapter "
                       "another name", param="lora_name", code="invalid_value")
    if client.adapter_id(name) is not None:
        raise APIError(400, f"lora_name={excerpt(name)} is already loaded; unload it first "
                       "(POST /v1/unload_lora_adapter) or give the adapter another name", param="lora_name",
                       code="invalid_value")
    if not _has_adapter(path):
        raise APIError(404, f"lora_path={excerpt(path)}: no adapter there (no {ADAPTER_CONFIG}, nor a P-Tuning v2 "
                       "config.json with pre_seq_len, on the server); pass the directory a fine-tuning saved "
                       "(glmkit finetune's --output, or peft's save_pretrained)", "not_found_error", "lora_path",
                       "adapter_not_found")
    try:
        await client.load_adapter(name, path)
    except InvalidParameterError as e:  # --max-adapters reached, or the name (a race with another load of it)
        raise APIError(400, str(e), param="lora_name" if e.field != "max_adapters" else None, code="invalid_value")
    except GlmkitError as e:  # ModelLoadError: a malformed or unreadable adapter, or one made for another model
        message = str(e) if path in str(e) else f"lora_path={excerpt(path)}: {e}"
        raise APIError(400, message, param="lora_path", code="invalid_adapter")
    state.adapter_dirs[name] = path
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=Response, responses={
    200: {**TEXT, "description": "Unloaded: `Success: LoRA adapter '<name>' removed successfully.`"},
    **error_responses(400, 404, 409, 503)})
async def unload_lora_adapter(req: UnloadLoraAdapterRequest, request: Request):
    state = request.app.state.glmkit
    client = state.require_model()
    name = req.lora_name
    if client.adapter_id(name) is None:
        raise _not_loaded(client, name)
    try:
        await client.unload_adapter(name, UNLOAD_WAIT_S)
    except InvalidParameterError as e:
        if client.adapter_id(name) is None:  # another unload took it first
            raise _not_loaded(client, name)
        raise APIError(409, str(e), param="lora_name", code="adapter_in_use")  # still running requests
    state.adapter_dirs.pop(name, None)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _not_loaded(client, name: str) -> APIError:
    return APIError(404, f"lora_name={excerpt(name)}: no adapter of this name is loaded; loaded adapters: "
                    f"{', '.join(client.adapter_names()) or 'none'}", "not_found_error", "lora_name",
                    "adapter_not_found")

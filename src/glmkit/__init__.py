"""glmkit: deploy ChatGLM-family and Qwen/Llama chat models privately."""

from .engine.outputs import CompletionOutput, RequestOutput
from .engine.sampling_params import SamplingParams
from .engine.structured import StructuredOutput

__all__ = ["LLM", "SamplingParams", "StructuredOutput", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name):
    # LLM pulls in torch; import it lazily so `glmkit --help` stays fast.
    if name == "LLM":
        from .llm import LLM

        return LLM
    raise AttributeError(name)

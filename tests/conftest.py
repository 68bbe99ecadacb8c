import importlib.util
import json
import os

import pytest
import torch

# Without CUDA the Triton kernel tests run under Triton's interpreter, which must be chosen before triton is first
# imported by anyone: sentence-transformers (tests/test_embeddings.py) imports it through transformers, earlier in
# the run than the kernel tests (tests/triton_kernels.py says the same for a kernel test run on its own).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tokenizer_fixtures import train_sentencepiece, write_glm4_ranks, write_hf_tokenizer

# The in-process server fixtures (tiny_dir, app, client) of the test_server_{errors,streams,ops} modules; left
# out where the server's packages are not installed (a bare GPU machine running tests/test_gpu.py).
pytest_plugins = ["server_api_support"] if importlib.util.find_spec("fastapi") else []


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="session")
def glm4_ranks_path(tmp_path_factory):
    return write_glm4_ranks(tmp_path_factory.mktemp("glm4tok"))


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hftok")
    write_hf_tokenizer(out)
    return out


@pytest.fixture(autouse=True, scope="session")
def _one_cpu_thread():
    """Tiny test models run faster on one thread than on several (threading overhead dominates)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def sp(sp_model_path):
    from glmkit.tokenizers.chatglm_sp import ChatGLMSPTokenizer

    return ChatGLMSPTokenizer(sp_model_path)


@pytest.fixture(scope="session")
def reference_sp_model(sp_model_path, tmp_path_factory):
    """The tokenizer the golden files of the original ChatGLM code were made with (golden_support.py)."""
    from golden_support import golden_sp_model

    return golden_sp_model(sp_model_path, tmp_path_factory)


@pytest.fixture(scope="session")
def glm_dir(tmp_path_factory, sp_model_path, sp):
    """A tiny random ChatGLM checkpoint for the engine tests (only read, so one serves the session)."""
    from checkpoint_fixtures import make_chatglm_dir

    return make_chatglm_dir(tmp_path_factory.mktemp("glm-tiny"), sp_model_path, sp.vocab_size, seed=7)


@pytest.fixture(scope="session")
def g4(glm4_ranks_path):
    from glmkit.tokenizers.glm4 import GLM4Tokenizer

    return GLM4Tokenizer(glm4_ranks_path)


@pytest.fixture(scope="session")
def hf(hf_tokenizer_dir):
    from glmkit.tokenizers.hf import HFTokenizer

    config = json.loads((hf_tokenizer_dir / "tokenizer_config.json").read_text())
    return HFTokenizer(hf_tokenizer_dir / "tokenizer.json", config)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real `glmkit serve` with the embedded default model, shared by the client test modules; served under
    its own name and as `chatglm3-6b` (the model name LangChain's ChatGLM3 sends by default). Its knowledge
    bases live in `proc.kb_dir`."""
    from default_server import ALIAS, MODEL
    from server_fixtures import ServerProcess

    kb_dir = tmp_path_factory.mktemp("kb")
    proc = ServerProcess("--served-model-name", MODEL, "--served-model-name", ALIAS, "--kb-dir", str(kb_dir))
    proc.kb_dir = kb_dir
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium through Playwright (never a downloaded browser), one per test module."""
    from web_support import CHROMIUM, need_browser

    playwright = need_browser()
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()

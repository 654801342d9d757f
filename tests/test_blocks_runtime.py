"""KV-cache memory accounting, the throughput cache and the checkpoint fingerprint."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import (
    make_tiny_model,
    one_thread,  # noqa: F401 - autouse: one torch thread here
)

import blocks.fingerprint
import blocks.throughput
from blocks import LoadedBlocks, checkpoint_fingerprint, measure_throughput


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("l3"), "llama", "llama3", num_layers=4)


# -- KV cache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_are_known_up_front_and_exact(llama3, dtype):
    span = LoadedBlocks.load(llama3, 1, 4, dtype=dtype)
    cfg = span.config
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 16  # grouped-query attention
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize  # keys + values, one block
    assert span.cache_bytes_per_token() == 3 * per_token
    assert span.cache_bytes_per_token(4, 2, 4) == 4 * 2 * per_token
    cache = span.new_cache(3, 50, 2, 4)
    allocated = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    assert cache.nbytes == allocated == span.cache_bytes_per_token(3, 2, 4) * 50
    assert (cache.start, cache.end, cache.batch_size, cache.max_length, cache.length) == (
        2,
        4,
        3,
        50,
        0,
    )


def test_bloom_and_opt_cache_all_heads(tmp_path):
    for family in ("bloom", "opt"):
        span = LoadedBlocks.load(make_tiny_model(tmp_path / family, family, num_layers=2), 0, 2)
        cfg = span.config
        assert cfg.num_kv_heads == cfg.num_heads
        assert span.cache_bytes_per_token() == 2 * 2 * cfg.hidden_size * 4


# -- throughput ----------------------------------------------------------------------------------


def test_throughput_is_measured_once_and_cached(llama3, tmp_path, monkeypatch):
    monkeypatch.setattr(blocks.throughput, "BUDGET_S", 0.02)
    span = LoadedBlocks.load(llama3, 0, 2)
    first = measure_throughput(span, tmp_path, "tiny-llama3")
    assert first["inference_steps_per_s"] > 0 and first["forward_tokens_per_s"] > 0
    assert first["cached"] is False
    assert first["inference_steps_per_s"] == pytest.approx(first["block_inference_steps_per_s"] / 2)
    files = list(tmp_path.glob("throughput-*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["key"]["model"] == "tiny-llama3"

    def no_measuring(span):
        raise AssertionError("measured again although cached")

    monkeypatch.setattr(blocks.throughput, "_measure_block", no_measuring)
    # a span of 4 blocks of the same model reuses the per-block figures
    again = measure_throughput(LoadedBlocks.load(llama3, 0, 4), tmp_path, "tiny-llama3")
    assert again["cached"] is True
    assert again["block_forward_tokens_per_s"] == first["block_forward_tokens_per_s"]
    assert again["forward_tokens_per_s"] == pytest.approx(first["forward_tokens_per_s"] / 2)
    # another quantization or model name is another measurement
    for kwargs in ({"model_key": "other"}, {"force": True}):
        with pytest.raises(AssertionError, match="measured again"):
            measure_throughput(span, tmp_path, **{"model_key": "tiny-llama3", **kwargs})
    with pytest.raises(AssertionError, match="measured again"):
        measure_throughput(LoadedBlocks.load(llama3, 0, 1, quant="int8"), tmp_path, "tiny-llama3")


# -- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_identifies_the_weights(tmp_path):
    single = make_tiny_model(tmp_path / "a", "llama", num_layers=2)
    sharded = make_tiny_model(tmp_path / "b", "llama", num_layers=2, sharded=True)
    other_seed = make_tiny_model(tmp_path / "c", "llama", num_layers=2, seed=1)
    fp = checkpoint_fingerprint(single)
    assert len(fp) == 32 and int(fp, 16) >= 0
    assert checkpoint_fingerprint(sharded) == fp  # same weights, other sharding
    assert checkpoint_fingerprint(other_seed) != fp
    # one weight nudged
    nudged = tmp_path / "d"
    shutil.copytree(single, nudged)
    tensors = load_file(nudged / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 1e-3
    save_file(tensors, nudged / "model.safetensors", metadata={"format": "pt"})
    assert checkpoint_fingerprint(nudged) != fp
    # one config field changed
    changed = tmp_path / "e"
    shutil.copytree(single, changed)
    raw = json.loads((changed / "config.json").read_text())
    raw["rms_norm_eps"] = 1e-5
    (changed / "config.json").write_text(json.dumps(raw))
    assert checkpoint_fingerprint(changed) != fp


def test_fingerprint_is_cached_on_disk(tmp_path, monkeypatch):
    path = make_tiny_model(tmp_path / "m", "opt", num_layers=2)
    cache_dir = tmp_path / "cache"
    fp = checkpoint_fingerprint(path, cache_dir)
    assert len(list(cache_dir.glob("fingerprint-*.json"))) == 1
    calls = []
    real = blocks.fingerprint._compute
    monkeypatch.setattr(blocks.fingerprint, "_compute", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(blocks.fingerprint, "_memo", {})  # as in a fresh process
    assert checkpoint_fingerprint(path, cache_dir) == fp
    assert calls == []
    # a touched weight file (new mtime) is hashed again
    file = path / "model.safetensors"
    st = file.stat()
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert checkpoint_fingerprint(path, cache_dir) == fp
    assert calls == [1]

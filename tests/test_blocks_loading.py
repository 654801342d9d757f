"""Loading spans and client parts: only the needed tensors are read, and every failure a caller
can cause raises a specific BlocksError subclass with a readable message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file
from tiny_models import (
    load_reference,
    make_tiny_model,
    one_thread,  # noqa: F401 - autouse: one torch thread here
    reference_blocks,
)

import blocks.checkpoint
from blocks import (
    BlockRangeError,
    BlocksError,
    CheckpointError,
    ClientParts,
    InputError,
    LoadedBlocks,
    MissingTensor,
    UnsupportedArchitecture,
    load_config,
)


class Recorder:
    """Stands in for safetensors.safe_open, recording the files opened and tensors read."""

    def __init__(self):
        self.files: list[str] = []
        self.tensors: list[str] = []

    def __call__(self, filename, framework, device="cpu"):
        self.files.append(Path(filename).name)
        real = safetensors.safe_open(filename, framework=framework, device=device)
        recorder = self

        class Handle:
            def __enter__(self):
                self.f = real.__enter__()
                return self

            def __exit__(self, *exc):
                return real.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_tensor(self, name):
                recorder.tensors.append(name)
                return self.f.get_tensor(name)

        return Handle()


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("single"), "llama", num_layers=4)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("sharded"), "llama", num_layers=4, sharded=True)


def _block_names(path: Path, index: int) -> set[str]:
    weight_map = blocks.checkpoint.Checkpoint(path).weight_map
    return {n for n in weight_map if n.startswith(f"model.layers.{index}.")}


def test_single_file_span_reads_only_its_blocks(single, monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(blocks.checkpoint, "safe_open", recorder)
    LoadedBlocks.load(single, 1, 3)
    assert set(recorder.files) == {"model.safetensors"}
    assert set(recorder.tensors) == _block_names(single, 1) | _block_names(single, 2)
    assert len(recorder.tensors) == len(set(recorder.tensors))  # each read once


def test_sharded_span_opens_only_its_shards(sharded, monkeypatch):
    weight_map = blocks.checkpoint.Checkpoint(sharded).weight_map
    assert len(set(weight_map.values())) >= 4  # really sharded
    needed = {weight_map[n] for n in _block_names(sharded, 2)}
    recorder = Recorder()
    monkeypatch.setattr(blocks.checkpoint, "safe_open", recorder)
    LoadedBlocks.load(sharded, 2, 3)
    assert set(recorder.files) == needed
    assert set(recorder.tensors) == _block_names(sharded, 2)


def test_sharded_span_loads_without_the_other_shards(sharded, tmp_path):
    """Delete every shard that holds no tensor of block 2: loading still works, same outputs."""
    part = tmp_path / "part"
    shutil.copytree(sharded, part)
    weight_map = blocks.checkpoint.Checkpoint(part).weight_map
    needed = {weight_map[n] for n in _block_names(part, 2)}
    removed = [f for f in set(weight_map.values()) if f not in needed]
    assert removed
    for name in removed:
        (part / name).unlink()
    x = torch.randn(1, 7, 64)
    out = LoadedBlocks.load(part, 2, 3).forward(x)
    assert torch.equal(out, LoadedBlocks.load(sharded, 2, 3).forward(x))
    with pytest.raises(CheckpointError, match="missing"):
        LoadedBlocks.load(part, 0, 1)


def test_client_parts_read_no_block_tensors(single, monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(blocks.checkpoint, "safe_open", recorder)
    ClientParts.load(single)
    assert set(recorder.tensors) == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    }


def test_sharded_and_single_file_give_identical_spans(single, sharded):
    x = torch.randn(2, 5, 64)
    assert torch.equal(
        LoadedBlocks.load(single, 0, 4).forward(x), LoadedBlocks.load(sharded, 0, 4).forward(x)
    )


def test_old_style_rope_scaling_config(tmp_path):
    """Checkpoints saved before transformers 5 spell Llama 3 rope as rope_scaling + rope_theta."""
    new = make_tiny_model(tmp_path / "new", "llama", "llama3", num_layers=2)
    old = tmp_path / "old"
    shutil.copytree(new, old)
    raw = json.loads((old / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = params
    (old / "config.json").write_text(json.dumps(raw))
    assert load_config(old).rope == load_config(new).rope
    assert load_config(old).rope.type == "llama3"
    x = torch.randn(1, 9, 64)
    with torch.no_grad():
        expected = reference_blocks(load_reference(new), x, 0, 2)
    out = LoadedBlocks.load(old, 0, 2).forward(x)
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_bloom_checkpoint_without_transformer_prefix(tmp_path):
    """Some BLOOM checkpoints name tensors h.0.* instead of transformer.h.0.*."""
    path = make_tiny_model(tmp_path / "b", "bloom", num_layers=2)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(path / "config.json", bare / "config.json")
    tensors = load_file(path / "model.safetensors")
    save_file(
        {k.removeprefix("transformer."): v for k, v in tensors.items()}, bare / "model.safetensors"
    )
    x = torch.randn(1, 5, load_config(path).hidden_size)
    assert torch.equal(
        LoadedBlocks.load(bare, 0, 2).forward(x), LoadedBlocks.load(path, 0, 2).forward(x)
    )
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(ClientParts.load(bare).embed(ids), ClientParts.load(path).embed(ids))


# -- errors ------------------------------------------------------------------------------------


def test_missing_tensor_is_reported_only_when_needed(single, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(single / "config.json", broken / "config.json")
    tensors = load_file(single / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(MissingTensor, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        LoadedBlocks.load(broken, 1, 3)
    LoadedBlocks.load(broken, 0, 2)  # blocks that do not need it load fine


def test_missing_lm_head_of_untied_model(single, tmp_path):
    broken = tmp_path / "nohead"
    broken.mkdir()
    shutil.copy(single / "config.json", broken / "config.json")
    tensors = load_file(single / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(MissingTensor, match="lm_head.weight"):
        ClientParts.load(broken)


def test_wrong_tensor_shape(single, tmp_path):
    broken = tmp_path / "shape"
    broken.mkdir()
    shutil.copy(single / "config.json", broken / "config.json")
    tensors = load_file(single / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="shape"):
        LoadedBlocks.load(broken, 0, 1)


def test_checkpoint_errors(single, tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        LoadedBlocks.load(tmp_path / "nowhere", 0, 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(single / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="safetensors"):
        LoadedBlocks.load(empty, 0, 1)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(single / "config.json", corrupt / "config.json")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(CheckpointError):
        LoadedBlocks.load(corrupt, 0, 1)


def _config_variant(single: Path, tmp_path: Path, **changes) -> Path:
    path = tmp_path / "variant"
    shutil.copytree(single, path)
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"model_type": "gpt2"}, "gpt2"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "sliding"),
        ({"hidden_act": "gelu_fast"}, "gelu_fast"),
    ],
)
def test_unsupported_architecture(single, tmp_path, changes, pattern):
    path = _config_variant(single, tmp_path, **changes)
    with pytest.raises(UnsupportedArchitecture, match=pattern):
        LoadedBlocks.load(path, 0, 1)
    with pytest.raises(UnsupportedArchitecture):
        ClientParts.load(path)


@pytest.mark.parametrize("start, end", [(3, 9), (-1, 2), (2, 2), (3, 1), (4, 5), (1.0, 3)])
def test_block_range_outside_the_model(single, start, end):
    with pytest.raises(BlockRangeError, match=r"\[0, 4\)"):
        LoadedBlocks.load(single, start, end)


def test_sub_interval_outside_the_span(single):
    span = LoadedBlocks.load(single, 1, 3)
    x = torch.randn(1, 4, 64)
    for start, end in [(0, 2), (1, 4), (2, 2), (0, 1)]:
        with pytest.raises(BlockRangeError, match=r"\[1, 3\)"):
            span.forward(x, start=start, end=end)
        with pytest.raises(BlockRangeError):
            span.backward(x, x, start=start, end=end)
        with pytest.raises(BlockRangeError):
            span.new_cache(1, 8, start, end)
        with pytest.raises(BlockRangeError):
            span.cache_bytes_per_token(1, start, end)
    other = LoadedBlocks.load(single, 0, 4).new_cache(1, 8)  # a cache over blocks this span lacks
    with pytest.raises(BlockRangeError):
        span.step(x, other)


def test_input_errors_name_expected_and_got(single):
    span = LoadedBlocks.load(single, 0, 2)
    good = torch.randn(2, 4, 64)
    cases = [
        (torch.randn(4, 64), r"\[batch, tokens, 64\].*\(4, 64\)"),
        (torch.randn(2, 4, 32), r"\[batch, tokens, 64\].*\(2, 4, 32\)"),
        (torch.randn(2, 0, 64), r"\(2, 0, 64\)"),
        (good.double(), r"torch\.float32.*torch\.float64"),
        (good.bfloat16(), r"torch\.float32.*torch\.bfloat16"),
        ([[1.0]], "tensor"),
    ]
    for hidden, pattern in cases:
        with pytest.raises(InputError, match=pattern):
            span.forward(hidden)
        with pytest.raises(InputError, match=pattern):
            span.step(hidden, span.new_cache(2, 8))
    with pytest.raises(InputError, match="grad_out"):
        span.backward(good, torch.randn(2, 3, 64))
    for prompts in (
        torch.randn(3, 2, 2, 64),
        torch.randn(2, 3, 2, 64),
        torch.randn(2, 2, 5, 64),
        torch.randn(2, 2, 64),
    ):
        with pytest.raises(InputError, match="prompts"):
            span.forward(good, prompts)
    with pytest.raises(InputError, match="prompts"):
        span.forward(good, torch.randn(2, 1, 2, 64).double())


def test_step_errors_leave_the_cache_unchanged(single):
    span = LoadedBlocks.load(single, 0, 2)
    cache = span.new_cache(2, 6)
    span.step(torch.randn(2, 4, 64), cache)
    with pytest.raises(InputError, match="max_length 6"):
        span.step(torch.randn(2, 3, 64), cache)
    with pytest.raises(InputError, match="batch size 1"):
        span.step(torch.randn(1, 1, 64), cache)
    with pytest.raises(InputError, match="KVCache"):
        span.step(torch.randn(2, 1, 64), "cache")
    assert cache.length == 4
    span.step(torch.randn(2, 2, 64), cache)  # still usable up to max_length
    assert cache.length == 6 and cache.free == 0
    cache.truncate(3)
    assert cache.length == 3
    with pytest.raises(InputError):
        cache.truncate(5)
    with pytest.raises(InputError):
        span.new_cache(0, 8)


def test_load_option_errors(single):
    with pytest.raises(InputError, match="int4"):
        LoadedBlocks.load(single, 0, 1, quant="int4")
    with pytest.raises(InputError, match="float64"):
        LoadedBlocks.load(single, 0, 1, dtype=torch.float64)
    span = LoadedBlocks.load(single, 0, 1, dtype="bfloat16")
    assert span.dtype == torch.bfloat16


def test_client_input_errors(single, tmp_path):
    parts = ClientParts.load(single)
    with pytest.raises(InputError, match=r"\[0, 384\)"):
        parts.embed(torch.tensor([[1, 384]]))
    with pytest.raises(InputError, match=r"\[0, 384\)"):
        parts.embed(torch.tensor([[-1, 2]]))
    with pytest.raises(InputError, match="integer"):
        parts.embed(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(InputError, match=r"\[batch, tokens\]"):
        parts.embed(torch.tensor([1, 2]))
    with pytest.raises(InputError, match="past_length"):
        parts.embed(torch.tensor([[1, 2]]), past_length=-1)
    with pytest.raises(InputError, match=r"\[batch, tokens, 64\]"):
        parts.logits(torch.randn(1, 2, 65))
    with pytest.raises(InputError, match="float32"):
        parts.logits(torch.randn(1, 2, 64).half())
    opt = ClientParts.load(make_tiny_model(tmp_path / "opt", "opt", num_layers=1))
    assert opt.embed(torch.tensor([[5]]), past_length=511).shape == (1, 1, 64)
    with pytest.raises(InputError, match="512"):
        opt.embed(torch.tensor([[5, 6]]), past_length=511)


def test_every_error_is_a_blocks_error():
    for cls in (
        BlockRangeError,
        CheckpointError,
        InputError,
        MissingTensor,
        UnsupportedArchitecture,
    ):
        assert issubclass(cls, BlocksError)

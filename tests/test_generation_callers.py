"""The callers of the generation engine, without daemons: the torch client's `generate`, the
demo's reference and the benchmarks' loops, each over a fake daemon session that runs the
blocks in this process."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_swarm import session_generate
from benchmarks.common import SingleProcessModel
from blocks import LoadedBlocks
from peerd.client import AutoDistributedModelForCausalLM
from peerd.demo.run import local_greedy
from tests.tiny_models import load_reference, make_tiny_model

PROMPTS = [[5, 17, 42, 7, 99, 4], [8, 9, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("callers") / "llama", "llama", num_layers=3)


class FakeSession:
    """What `DaemonClient.session` returns, over a local span and KV cache."""

    def __init__(
        self, span: LoadedBlocks, max_length: int, batch_size: int, pad_lengths=None
    ) -> None:
        self.span = span
        self.cache = span.new_cache(batch_size, max_length, pad_lengths=pad_lengths)
        self.route = [("local", 0, span.end)]
        self.recoveries = 0
        self.steps = 0

    def step(self, hidden: torch.Tensor, reorder=None) -> torch.Tensor:
        self.steps += 1
        if reorder is not None:
            self.cache.reorder(reorder)
        return self.span.step(hidden, self.cache)

    def __enter__(self) -> FakeSession:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class FakePeer:
    def __init__(self, model_dir) -> None:
        self.span = LoadedBlocks.load(model_dir, 0, 3)
        self.sessions: list[FakeSession] = []

    def session(self, model, max_length: int, *, batch_size: int = 1, pad_lengths=None):
        self.sessions.append(FakeSession(self.span, max_length, batch_size, pad_lengths))
        return self.sessions[-1]


def reference(model_dir, prompts, **kwargs) -> torch.Tensor:
    ids = torch.tensor(prompts)
    return load_reference(model_dir).generate(ids, attention_mask=torch.ones_like(ids), **kwargs)


def test_torch_client_generate_equals_transformers(model_dir):
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, peer=FakePeer(model_dir))
    out = model.generate(torch.tensor(PROMPTS), max_new_tokens=8)
    assert out.tolist() == reference(model_dir, PROMPTS, max_new_tokens=8, do_sample=False).tolist()
    # two EOS ids that this model produces: rows end at different steps and are filled with the pad id
    kwargs = dict(max_new_tokens=8, eos_token_id=[132, 139], pad_token_id=0, repetition_penalty=1.1)
    out = model.generate(torch.tensor(PROMPTS), **kwargs)
    expected = reference(model_dir, PROMPTS, do_sample=False, **kwargs)
    assert out.tolist() == expected.tolist()
    assert out.shape[1] < len(PROMPTS[0]) + 8  # both rows did end early


def test_torch_client_sampling_shapes_and_seed(model_dir):
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, peer=FakePeer(model_dir))
    kwargs = dict(max_new_tokens=5, do_sample=True, num_return_sequences=2, seed=3, eos_token_id=[])
    out = model.generate(torch.tensor(PROMPTS), **kwargs)
    assert out.shape == (4, 6 + 5)
    assert out[:2, :6].tolist() == [PROMPTS[0]] * 2 and out[2:, :6].tolist() == [PROMPTS[1]] * 2
    assert torch.equal(out, model.generate(torch.tensor(PROMPTS), **kwargs))


def test_torch_client_padding_and_beams_equal_transformers(model_dir):
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, peer=FakePeer(model_dir))
    ids = torch.tensor([[3, 3, 5, 17, 42, 7], [8, 9, 10, 11, 12, 13], [3, 3, 3, 4, 21, 30]])
    mask = (torch.arange(6)[None] >= torch.tensor([[2], [0], [3]])).long()
    kwargs = dict(max_new_tokens=5, eos_token_id=[], pad_token_id=3, do_sample=False)
    out = model.generate(ids, attention_mask=mask, **kwargs)
    ref = load_reference(model_dir).generate(ids, attention_mask=mask, **kwargs)
    assert out.tolist() == ref.tolist()
    beams = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, eos_token_id=None)
    out = model.generate(torch.tensor(PROMPTS), **beams)
    expected = reference(model_dir, PROMPTS, do_sample=False, pad_token_id=0, **beams)
    assert out.tolist() == expected.tolist()


def test_torch_client_refuses_bad_arguments(model_dir):
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, peer=FakePeer(model_dir))
    ids = torch.tensor(PROMPTS)
    mask = torch.ones_like(ids)
    mask[1, 1], mask[1, 3] = 1, 0
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, do_sample=True, temperature=0.0)


def test_demo_reference_and_benchmark_loops_equal_transformers(model_dir):
    expected = reference(
        model_dir, PROMPTS[:1], max_new_tokens=10, do_sample=False, eos_token_id=None,
        pad_token_id=0,
    )[0, 6:].tolist()  # fmt: skip
    assert local_greedy(model_dir, PROMPTS[0], 10) == expected
    local = SingleProcessModel(model_dir)
    run = local.generate(PROMPTS[0], 10)
    assert run.tokens == expected and len(run.times) == 10
    peer = FakePeer(model_dir)
    seen = []
    run = session_generate(
        peer, local, model_dir, PROMPTS[0], 10, on_step=lambda s, _: seen.append(s)
    )
    assert run.tokens == expected and len(run.times) == 10
    assert seen == list(range(10)) and peer.sessions[0].steps == 10

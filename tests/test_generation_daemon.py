"""The daemon's `generate` (LocalAPI._generate) through a real chain of in-process servers.

Real `BlockServer`s over spans of a tiny Llama, spoken to over in-memory streams (as in
test_chain_recovery.py); the test reads what `_generate` writes to its channel.
"""

from __future__ import annotations

import pytest
import torch
import trio
import trio.testing

import wire
from blocks import LoadedBlocks, checkpoint_fingerprint
from peerd.framed import FramedChannel, TrioByteStream
from peerd.local_api import LocalAPI
from peerd.local_api.connection import ApiConnection
from peerd.local_api.generate_params import params_for_request
from peerd.server.block_server import BlockServer
from peerd.server.limits import ServerLimits
from peerd.swarm import SwarmAccess
from routing import ServerSpan
from tests.tiny_models import load_reference, make_tiny_model
from wire import WireError
from wire import local as api

PROMPT = [5, 17, 42, 7, 99, 4]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("daemon-gen") / "llama", "llama", num_layers=4)


class FakeSwarm:
    """What LocalAPI needs of SwarmAccess: two servers, [0, 2) and [2, 4), in this process."""

    def __init__(self, model_dir, cache_dir, nursery: trio.Nursery) -> None:
        self.cache_dir, self.nursery = cache_dir, nursery
        fingerprint = checkpoint_fingerprint(model_dir, cache_dir)
        self.model_id = f"{SwarmAccess.model_name_for(model_dir)}@{fingerprint}"
        self.servers = {
            name: BlockServer(LoadedBlocks.load(model_dir, a, b), self.model_id, ServerLimits())
            for name, (a, b) in {"a": (0, 2), "b": (2, 4)}.items()
        }
        self.probe_rtts = None
        self.model_name_for = SwarmAccess.model_name_for

    async def server_spans(self, model_id: str) -> list[ServerSpan]:
        return [
            ServerSpan(n, s.span.start, s.span.end, throughput=100.0)
            for n, s in self.servers.items()
        ]

    async def connect(self, peer_id: str, protocol: str) -> FramedChannel:
        ours, theirs = trio.testing.memory_stream_pair()
        channel = FramedChannel(TrioByteStream(theirs), wire.DEFAULT_MAX_FRAME)
        self.nursery.start_soon(self.servers[peer_id].handle_inference, channel)
        return FramedChannel(TrioByteStream(ours), wire.DEFAULT_MAX_FRAME)


class Recorder:
    def __init__(self) -> None:
        self.messages: list[wire.Message] = []

    async def write_message(self, raw: dict) -> None:
        self.messages.append(wire.parse_message(raw))


def generate(model_dir, tmp_path, request: api.Generate) -> list[wire.Message]:
    async def main():
        async with trio.open_nursery() as nursery:
            swarm = FakeSwarm(model_dir, tmp_path / "cache", nursery)
            recorder = Recorder()
            try:
                handler = LocalAPI(swarm, tmp_path / "sock").handlers[api.Generate]
                await handler(request, ApiConnection(recorder))
            except WireError as exc:  # raised out of the nursery it would come in a group
                return exc
            finally:
                nursery.cancel_scope.cancel()
        return recorder.messages

    out = trio.run(main)
    if isinstance(out, WireError):
        raise out
    return out


def test_daemon_generate_equals_transformers(model_dir, tmp_path):
    request = api.Generate(model=str(model_dir), input_ids=PROMPT, max_new_tokens=8)
    messages = generate(model_dir, tmp_path, request)
    done = messages[-1]
    ref = load_reference(model_dir).generate(
        torch.tensor([PROMPT]),
        attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
        max_new_tokens=8,
        do_sample=False,
    )  # fmt: skip  (the checkpoint's EOS id 2 applies to both)
    assert isinstance(done, api.GenerationDone)
    assert done.token_ids == ref[0, len(PROMPT) :].tolist()
    assert [m.token_id for m in messages[:-1]] == done.token_ids
    assert "".join(m.text for m in messages[:-1]) == done.text
    assert [hop[1:] for hop in done.route] == [(0, 2), (2, 4)]


def test_daemon_generate_with_text_and_stop(model_dir, tmp_path):
    free = generate(
        model_dir, tmp_path, api.Generate(model=str(model_dir), prompt="hello", max_new_tokens=10)
    )[-1]
    assert free.stop_reason in ("length", "eos")
    stop = free.text[2:4]
    if not stop or stop.isspace():
        pytest.skip("the tiny model's text has no usable stop string")
    request = api.Generate(model=str(model_dir), prompt="hello", max_new_tokens=10, stop=[stop])
    done = generate(model_dir, tmp_path, request)[-1]
    assert done.stop_reason == "stop"
    assert done.text == free.text[: free.text.index(stop)]


def test_daemon_beam_search_equals_transformers(model_dir, tmp_path):
    """Servers reorder their caches by hypothesis every step (Step.reorder)."""
    request = api.Generate(
        model=str(model_dir), input_ids=PROMPT, max_new_tokens=6, num_beams=3, eos_token_id=[]
    )
    done = generate(model_dir, tmp_path, request)[-1]
    ref = load_reference(model_dir).generate(
        torch.tensor([PROMPT]),
        attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
        max_new_tokens=6,
        min_new_tokens=6,
        num_beams=3,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert done.token_ids == ref[0, len(PROMPT) :].tolist()


def test_wire_generate_keeps_old_meanings(model_dir):
    old = api.Generate(model="m", input_ids=PROMPT)  # what an old script sends
    params = params_for_request(old, model_dir)
    assert not params.do_sample and params.eos_token_id == (2,)  # greedy, the checkpoint's EOS
    greedy = api.Generate(model="m", input_ids=PROMPT, temperature=0.0, top_k=0)
    assert not params_for_request(greedy, model_dir).do_sample
    hot = params_for_request(
        api.Generate(model="m", input_ids=PROMPT, temperature=0.7, top_k=5, eos_token_id=[]),
        model_dir,
    )
    assert (hot.do_sample, hot.temperature, hot.top_k, hot.eos_token_id) == (True, 0.7, 5, ())
    new = api.Generate(model="m", input_ids=PROMPT, do_sample=False, temperature=0.7, min_p=0.1)
    assert wire.parse_message(new.to_wire()) == new
    assert not params_for_request(new, model_dir).do_sample
    with pytest.raises(wire.WireError, match="temperature"):
        api.Generate(model="m", input_ids=PROMPT, do_sample=True, temperature=0.0)
    raw = old.to_wire()
    for key in ("do_sample", "min_p", "num_beams", "length_penalty", "eos_token_id"):
        assert key not in raw  # newer fields travel only when set: older daemons read it
    assert wire.parse_message(raw) == old

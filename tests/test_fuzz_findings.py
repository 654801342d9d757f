"""Defects the daemon fuzzer found (tests/fuzz_daemons_run.py), each as a minimal repro:
both fail on the code before issue 9's fixes (a chain no server could hold banned the only
server daemon-wide; int8 data declared float64 was decoded, +223 MiB, before being refused).
"""

from __future__ import annotations

import struct

import pytest
import torch
import trio

import wire
from tests.fuzz_frames import frame_of, pack
from tests.launcher import HarnessGroup
from tests.tiny_models import make_tiny_model
from wire import local as api

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from blocks import checkpoint_fingerprint

    root = tmp_path_factory.mktemp("findings")
    model = make_tiny_model(root / "tiny", "llama", num_layers=2)
    with HarnessGroup(root / "homes", announce_period=5.0) as group:
        server = group.spawn("server", str(model), "--blocks", "0:2", "--new-swarm",
                             "--rebalance-period", "0", command="serve")  # fmt: skip
        server.wait_ready()
        client = group.spawn("client", "--initial-peers", server.addrs[0])
        server.wait_online()
        client.wait_ready()
        yield {"model": model, "model_id": f"tiny@{checkpoint_fingerprint(model)}",
               "server": server, "client": client}  # fmt: skip


async def _local(socket, *messages: wire.Message) -> list[wire.Message]:
    """Send each request on one connection; the last reply of each (generations streamed)."""
    from peerd.framed import FramedChannel, TrioByteStream

    stream = await trio.open_unix_socket(str(socket))
    channel = FramedChannel(TrioByteStream(stream), wire.DEFAULT_MAX_FRAME)
    out = []
    with trio.fail_after(60):
        for message in messages:
            await channel.write_message(message.to_wire())
            reply = wire.parse_message(await channel.read_message())
            while isinstance(reply, api.GeneratedToken):
                reply = wire.parse_message(await channel.read_message())
            out.append(reply)
    await stream.aclose()
    return out


def test_a_chain_too_big_for_any_server_does_not_break_other_generations(pair):
    model, socket = str(pair["model"]), pair["client"].socket
    generate = api.Generate(model, input_ids=[5, 17, 42], max_new_tokens=3, eos_token_id=[])
    (warm,) = trio.run(_local, socket, generate)
    assert isinstance(warm, api.GenerationDone), warm

    async def too_big_chain(done: list) -> None:
        from peerd.framed import FramedChannel, TrioByteStream

        stream = await trio.open_unix_socket(str(socket))
        channel = FramedChannel(TrioByteStream(stream), wire.DEFAULT_MAX_FRAME)
        await channel.write_message(api.OpenChain(model, max_length=2**16).to_wire())
        opened = wire.parse_message(await channel.read_message())
        if not isinstance(opened, api.ChainOpened):  # refused up front: fine
            done.append(opened)
            return
        step = api.ChainStep(opened.chain_id, torch.zeros(1, 1, 64))
        await channel.write_message(step.to_wire())
        done.append(wire.parse_message(await channel.read_message()))
        await stream.aclose()

    async def body():
        refused: list = []
        async with trio.open_nursery() as nursery:  # another script's generation meanwhile
            nursery.start_soon(too_big_chain, refused)
            await trio.sleep(0.2)
            result = await _local(socket, generate)
        assert isinstance(refused[0], wire.Error), refused  # cache_full for the big one only
        return result

    (after,) = trio.run(body)
    assert isinstance(after, api.GenerationDone), f"{after!r:.300}"
    assert after.token_ids == warm.token_ids


def test_int8_data_declared_float64_is_refused_before_it_is_expanded(pair):
    """The decoded-size cap refuses a 17 MiB frame that would decode to 128 MiB before it is
    expanded: the server grows by the frame's own buffers (read, then unpacked), not by the
    tensor it claims."""
    import psutil

    from peerd.config import NodeConfig
    from peerd.framed import FramedChannel, Libp2pByteStream
    from peerd.server.block_server import RPC_PROTOCOL
    from tests.netharness import run_with_node

    server = pair["server"]
    tokens = 262_144  # 16 MiB of codes + 1 MiB of scales; 128 MiB once decoded as float64
    numel = tokens * 64
    hidden = {"dtype": "float64", "shape": [1, tokens, 64], "compression": "int8",
              "data": bytes(numel), "scales": struct.pack("<f", 0.01) * (numel // 64),
              "block": 64}  # fmt: skip
    frame = frame_of(pack({"v": 1, "type": "forward", "model_id": pair["model_id"], "start": 0,
                           "end": 2, "hidden": hidden, "compression": "int8"}))  # fmt: skip
    proc = psutil.Process(server.pid)
    base, peak = proc.memory_info().rss, [0]

    async def body(node):
        async def sample():
            while True:
                peak[0] = max(peak[0], proc.memory_info().rss)
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            stream = await node.open_stream(server.peer_id, RPC_PROTOCOL)
            channel = FramedChannel(Libp2pByteStream(stream), wire.DEFAULT_MAX_FRAME)
            await channel.stream.send_all(frame)
            reply = wire.parse_message(await channel.read_message())
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        return reply

    root = server.home.parent / "probe"
    config = NodeConfig(home=root, host="127.0.0.1", initial_peers=[server.addrs[0]],
                        reachability="private")  # fmt: skip
    reply = run_with_node(config, body, timeout=120)
    assert isinstance(reply, wire.Error) and reply.code == "too_large", reply
    grew = (peak[0] - base) / 2**20
    print(f"server RSS grew {grew:.0f} MiB for a {len(frame) / 2**20:.0f} MiB frame")
    decoded = numel * 8 / 2**20
    assert grew < decoded / 2, (
        f"server RSS grew {grew:.0f} MiB: the {decoded:.0f} MiB tensor was built"
    )

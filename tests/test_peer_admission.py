"""Per-peer limits on connections, streams and bytes in flight (issue 9)."""

from __future__ import annotations

import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair

import wire
from peerd.framed import ByteBudget, FramedChannel, TrioByteStream
from peerd.host import CONNECTION_LIMITS, listen_multiaddr, make_host
from peerd.server.streams import PeerAdmission
from wire import ErrorCode


def _pair(peer_id):
    ours, theirs = trio.testing.memory_stream_pair()
    server = FramedChannel(TrioByteStream(theirs), wire.DEFAULT_MAX_FRAME, peer_id=peer_id)
    return FramedChannel(TrioByteStream(ours), wire.DEFAULT_MAX_FRAME), server


def test_a_peer_gets_at_most_its_streams_others_are_unaffected():
    admission = PeerAdmission(max_streams=2, max_bytes=2**20)
    release = trio.Event()

    async def hold(channel):
        await release.wait()

    async def main():
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(admission.serve, hold, _pair("a")[1])
            await trio.testing.wait_all_tasks_blocked()
            client, server = _pair("a")
            await admission.serve(hold, server)  # refused at once
            reply = wire.parse_message(await client.read_message())
            assert reply.code == ErrorCode.BUSY and "too many streams" in reply.message
            nursery.start_soon(admission.serve, hold, _pair("b")[1])
            nursery.start_soon(admission.serve, hold, _pair(None)[1])  # our own pipe
            await trio.testing.wait_all_tasks_blocked()
            assert admission.open_streams("a") == 2 and admission.open_streams("b") == 1
            release.set()
        assert admission.open_streams("a") == 0

    trio.run(main)


def test_bytes_in_flight_of_one_peer_wait_for_room():
    async def main():
        budget = ByteBudget(1000)
        a, b = _pair("a"), _pair("a")
        for _, server in (a, b):
            server.byte_budget = budget
        frame = wire.encode_frame(wire.Ping(nonce=1).to_wire())
        # a first frame's header came and the rest is slow: its bytes are held meanwhile
        await a[0].stream.send_all(frame[:5])
        got = []

        async def read(server):
            got.append(await server.read_message())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, a[1])
            await trio.testing.wait_all_tasks_blocked()
            assert budget.used == len(frame) - wire.HEADER_SIZE
            budget.used = 1000 - 1  # as if other streams held the rest
            await b[0].stream.send_all(frame)
            nursery.start_soon(read, b[1])
            await trio.testing.wait_all_tasks_blocked()
            assert len(got) == 0  # b waits for room
            budget.release(1000 - 1 - (len(frame) - wire.HEADER_SIZE))
            await a[0].stream.send_all(frame[5:])
        assert len(got) == 2 and budget.used == 0

    trio.run(main)


def test_the_host_limits_connections_per_peer_with_libp2ps_resource_manager():
    host = make_host(create_new_key_pair(), listen=listen_multiaddr("127.0.0.1", 0))
    manager = host.get_network()._resource_manager
    assert manager is not None
    assert manager.connection_limits is CONNECTION_LIMITS
    assert CONNECTION_LIMITS.max_established_per_peer == 16

"""Real `peerd serve` daemons on loopback, spoken to by hand over libp2p streams.

One swarm for the module: a bootstrap `peerd join --new-swarm`, three `peerd serve
--num-blocks 3` daemons of an 8-block tiny Llama started all at once (they must spread out
over all 8 blocks by themselves), and one "limits" server of another tiny model with small
session limits. The test peer is an in-process Node that finds servers in the DHT and speaks
the wire protocol directly (no chain, no client library), so every byte it sends is chosen
by the test: correct requests checked against the local reference span, and malformed,
oversized or out-of-range ones that must get a structured error while other sessions carry
on. Tests that kill or stop daemons run last.
"""

from __future__ import annotations

import re
import struct
import time
import uuid
from functools import partial

import pytest
import torch
import trio
from click.testing import CliRunner

import wire
from blocks import LoadedBlocks, checkpoint_fingerprint
from peerd.config import NodeConfig
from peerd.demo.tiny import TinyLlama, write_tiny_llama
from peerd.framed import ConnectionLost, FramedChannel, Libp2pByteStream
from peerd.records import ServerRecord, State
from peerd.server.block_server import INFERENCE_PROTOCOL, RPC_PROTOCOL
from tests.launcher import HarnessGroup as DaemonGroup
from tests.netharness import run_with_node, wait_for

pytestmark = pytest.mark.slow

NUM_BLOCKS = 8
SERVERS = ("s1", "s2", "s3")
PERIOD = 5.0  # announce period: a record lives two of them
REBALANCE = 3.0
CACHE_TOKENS = 256
SESSION_LENGTH = 32
LIMITS_MAX_SESSIONS = 2
LIMITS_IDLE = 3.0
COVER_TIMEOUT = 75.0  # three servers starting at once on a busy 2-core machine, then moving
REPLY_TIMEOUT = 20.0
ATOL = 1e-4


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    with DaemonGroup(root / "homes", announce_period=PERIOD) as group:
        boot = group.spawn("boot", "--new-swarm")
        model = write_tiny_llama(root / "tiny", TinyLlama(num_layers=NUM_BLOCKS))
        small = write_tiny_llama(root / "small", TinyLlama(num_layers=2, seed=1))
        # servers started before the bootstrap listens would retry in vain for a minute
        # (py-libp2p keeps a peer whose dial failed in a 60 s negative cache)
        boot_addr = boot.wait_ready().addrs[0]
        join = ["--initial-peers", boot_addr]
        balanced = [
            *join,
            "--rebalance-period",
            str(REBALANCE),
            "--cache-tokens",
            str(CACHE_TOKENS),
        ]
        servers = {
            name: group.spawn(name, str(model), "--num-blocks", "3", *balanced, command="serve")
            for name in SERVERS
        }
        limited = ["--max-sessions", str(LIMITS_MAX_SESSIONS), "--idle-timeout", str(LIMITS_IDLE)]
        limited += ["--peer-share", "1"]  # the test's one peer may fill the server
        limits = group.spawn(
            "limits", str(small), "--blocks", "0:2", "--rebalance-period", "0", *join, *limited,
            command="serve",
        )  # fmt: skip
        for daemon in [*servers.values(), limits]:
            daemon.wait_ready()
            daemon.wait_online()
        yield {
            "root": root,
            "boot": boot,
            "model": model,
            "model_id": f"tiny@{checkpoint_fingerprint(model)}",
            "small_id": f"small@{checkpoint_fingerprint(small)}",
            "servers": servers,
            "limits": limits,
            "reference": LoadedBlocks.load(model, 0, NUM_BLOCKS),
        }


@pytest.fixture(scope="module")
def hidden_size(swarm) -> int:
    return swarm["reference"].config.hidden_size


def run_peer(swarm, body, *, timeout: float = 90.0):
    """Run `await body(node)` on a fresh in-process peer of the swarm.

    The peer is a DHT client: a short-lived DHT server would stay in the daemons' routing
    tables after it left, and every later lookup would wait on it.
    """
    home = swarm["root"] / f"peer-{uuid.uuid4().hex[:8]}"
    config = NodeConfig(
        home=home,
        host="127.0.0.1",
        initial_peers=[swarm["boot"].addrs[0]],
        announce_period=PERIOD,
        reachability="private",
    )
    began = time.monotonic()

    async def timed(node):
        print(f"[peer ready in {time.monotonic() - began:.1f} s]")
        try:
            return await body(node)
        finally:
            print(f"[body done at {time.monotonic() - began:.1f} s]")

    return run_with_node(config, timed, timeout=timeout)


# ----- speaking the wire protocol by hand -------------------------------------------------


async def open_channel(node, peer_id: str, protocol: str) -> FramedChannel:
    stream = await node.open_stream(peer_id, protocol)
    return FramedChannel(Libp2pByteStream(stream), wire.DEFAULT_MAX_FRAME)


async def call(channel: FramedChannel, message: wire.Message) -> wire.Message:
    await channel.write_message(message.to_wire())
    return await reply(channel)


async def reply(channel: FramedChannel, timeout: float = REPLY_TIMEOUT) -> wire.Message:
    with trio.fail_after(timeout):
        return wire.parse_message(await channel.read_message())


def expect_error(message: wire.Message, code: str) -> wire.Error:
    assert isinstance(message, wire.Error), f"expected a {code!r} error, got {message!r}"
    assert message.code == code, f"expected {code!r}, got {message.code}: {message.message}"
    return message


async def expect_closed(channel: FramedChannel) -> None:
    """The server hung up: the next read ends the stream (instead of hanging or replying)."""
    with trio.fail_after(REPLY_TIMEOUT), pytest.raises(ConnectionLost):
        await channel.read_message()


async def open_session(
    channel: FramedChannel, model_id: str, start: int, end: int, max_length: int = SESSION_LENGTH
) -> wire.Message:
    return await call(
        channel,
        wire.OpenSession(
            model_id=model_id,
            start=start,
            end=end,
            max_length=max_length,
            batch_size=1,
            compression="none",
            session_id=uuid.uuid4().hex,
        ),
    )


async def step(channel: FramedChannel, hidden: torch.Tensor, step_id: int) -> torch.Tensor:
    result = await call(channel, wire.Step(hidden=hidden, step_id=step_id))
    assert isinstance(result, wire.StepResult), result
    assert result.step_id == step_id
    return result.hidden


async def forward(channel: FramedChannel, model_id: str, start: int, end: int, hidden):
    return await call(channel, wire.Forward(model_id=model_id, start=start, end=end, hidden=hidden))


class Listing:
    """The servers of a model the test peer has seen, merged over DHT listings.

    One listing on a busy machine can miss a live server (a lookup timed out), as the client
    library knows too: keep each server's freshest record until it expires.
    """

    def __init__(self, node, model_id: str) -> None:
        self.node, self.model_id = node, model_id
        self.records: dict[str, ServerRecord] = {}
        self.history: list[str] = []  # how each listing went, for failure messages

    async def online(self) -> list[ServerRecord]:
        began = time.monotonic()
        fresh = await self.node.list_servers(self.model_id, include_offline=True)
        self.history.append(f"{len(fresh)} records in {time.monotonic() - began:.1f} s")
        for record in fresh:
            known = self.records.get(record.peer_id)
            if known is None or record.seq > known.seq:
                self.records[record.peer_id] = record
        now = time.time()
        return [r for r in self.records.values() if r.is_live(now) and r.state is State.ONLINE]


def chain_of(records: list[ServerRecord]) -> list[tuple[ServerRecord, int, int]]:
    """(server, start, end) hops covering all blocks, each server used once, in block order."""
    hops, position, left = [], 0, list(records)
    while position < NUM_BLOCKS:
        here = [r for r in left if r.start <= position < r.end]
        if not here:
            return []
        best = max(here, key=lambda r: (r.end, r.peer_id))
        hops.append((best, position, best.end))
        left.remove(best)
        position = best.end
    return hops


async def wait_for_cover(node, swarm, timeout: float = COVER_TIMEOUT):
    """(hops, listing): hops once the three servers are ONLINE and cover every block, or None."""
    ids = {d.peer_id for d in swarm["servers"].values()}
    listing = Listing(node, swarm["model_id"])

    async def covered():
        records = [r for r in await listing.online() if r.peer_id in ids]
        hops = chain_of(records)
        return hops if len(records) == len(ids) and hops else None

    return await wait_for(covered, timeout=timeout, interval=0.5), listing


async def covering_chain(node, swarm) -> list[tuple[ServerRecord, int, int]]:
    """The chain the first test found and saw stay put, else one found now."""
    if "hops" in swarm:
        return swarm["hops"]
    hops, listing = await wait_for_cover(node, swarm)
    assert hops, f"the servers do not cover all blocks; listings: {listing.history}"
    return hops


def random_hidden(hidden_size: int, tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, hidden_size, generator=generator)


# ----- the tests ----------------------------------------------------------------------------


def test_servers_started_together_spread_over_all_blocks(swarm):
    async def body(node):
        began = time.monotonic()
        hops, listing = await wait_for_cover(node, swarm)
        waited = time.monotonic() - began
        if not hops:
            return None, listing.history, waited, {}
        # covering once is not enough: servers moving in lockstep cover now and then
        await trio.sleep(2 * REBALANCE + 1)
        live = {}
        for record, _, _ in hops:  # each server's own word, not the DHT's
            channel = await open_channel(node, record.peer_id, RPC_PROTOCOL)
            info = await call(channel, wire.Info())
            assert isinstance(info, wire.InfoResult), info
            live[record.peer_id] = (info.record["start"], info.record["end"])
            await channel.aclose()
        return hops, listing.history, waited, live

    hops, history, waited, live = run_peer(swarm, body, timeout=COVER_TIMEOUT + 60)
    logs = {name: d.log_text() for name, d in swarm["servers"].items()}
    assert hops, f"never covered all {NUM_BLOCKS} blocks; listings: {history}; logs:" + "".join(
        f"\n--- {n}\n" + "\n".join(ln for ln in t.splitlines() if "peerd.serve:" in ln)
        for n, t in logs.items()
    )
    ours = {d.peer_id: name for name, d in swarm["servers"].items()}
    assert len(hops) == 3 and {record.peer_id for record, _, _ in hops} == set(ours)
    listed = {record.peer_id: (record.start, record.end) for record, _, _ in hops}
    assert live == listed, f"servers kept moving: listed {listed}, now {live}"
    covered = set()
    for peer_id, (start, end) in live.items():
        assert end - start == 3
        covered |= set(range(start, end))
        # the daemon chose its blocks itself and says where it went online last
        text = logs[ours[peer_id]]
        assert "chose blocks" in text
        assert re.findall(r"online: blocks (\d+):(\d+)", text)[-1] == (str(start), str(end))
    assert covered == set(range(NUM_BLOCKS))
    assert all(record.num_blocks == NUM_BLOCKS for record, _, _ in hops)
    swarm["hops"] = hops  # the next tests use these servers (a DHT listing takes seconds)
    print(f"all {NUM_BLOCKS} blocks covered {waited:.1f} s after every server was online")


def test_forward_by_hand_through_three_servers_matches_reference(swarm, hidden_size):
    hidden = random_hidden(hidden_size, 7, seed=1)

    async def body(node):
        hops = await covering_chain(node, swarm)
        x, route = hidden, []
        for record, start, end in hops:
            channel = await open_channel(node, record.peer_id, RPC_PROTOCOL)
            result = await forward(channel, swarm["model_id"], start, end, x)
            assert isinstance(result, wire.ForwardResult), result
            x = result.hidden
            route.append((start, end))
            await channel.aclose()
        return x, route

    out, route = run_peer(swarm, body)
    assert route[0][0] == 0 and route[-1][1] == NUM_BLOCKS and len(route) == 3
    expected = swarm["reference"].forward(hidden)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    assert not torch.allclose(out, hidden, atol=0.1)  # the blocks really did something


def test_inference_session_by_hand_through_three_servers_matches_reference(swarm, hidden_size):
    chunks = [random_hidden(hidden_size, n, seed=10 + i) for i, n in enumerate((4, 1, 1, 2))]

    async def body(node):
        hops = await covering_chain(node, swarm)
        channels = []
        for record, start, end in hops:
            channel = await open_channel(node, record.peer_id, INFERENCE_PROTOCOL)
            opened = await open_session(channel, swarm["model_id"], start, end)
            assert isinstance(opened, wire.SessionOpened), opened
            assert (opened.start, opened.end) == (start, end)
            channels.append(channel)
        outputs = []
        for step_id, chunk in enumerate(chunks):
            x = chunk
            for channel in channels:
                x = await step(channel, x, step_id)
            outputs.append(x)
        for channel in channels:
            await channel.write_message(wire.CloseSession().to_wire())
            await expect_closed(channel)
        return torch.cat(outputs, dim=1)

    out = run_peer(swarm, body)
    expected = swarm["reference"].forward(torch.cat(chunks, dim=1))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)


def test_bad_requests_get_errors_while_a_session_keeps_working(swarm, hidden_size):
    model_id, ref = swarm["model_id"], swarm["reference"]
    first, second = random_hidden(hidden_size, 3, seed=20), random_hidden(hidden_size, 2, seed=21)

    async def body(node):
        hops = await covering_chain(node, swarm)
        server, _, _ = hops[0]
        pid, start, end = server.peer_id, server.start, server.end
        outside = (start, end + 1) if end < NUM_BLOCKS else (start - 1, end)

        async def raw_inference_stream():
            return await node.open_stream(pid, INFERENCE_PROTOCOL)

        # the session that must survive everything below
        session = await open_channel(node, pid, INFERENCE_PROTOCOL)
        opened = await open_session(session, model_id, start, end)
        assert isinstance(opened, wire.SessionOpened), opened
        assert opened.free_cache_tokens == CACHE_TOKENS - SESSION_LENGTH
        out_first = await step(session, first, 0)

        # a header that announces more than the largest frame: "too_large", then hang up
        raw = await raw_inference_stream()
        await raw.write(struct.pack(">I", 2**31))
        channel = FramedChannel(Libp2pByteStream(raw), wire.DEFAULT_MAX_FRAME)
        expect_error(await reply(channel), "too_large")
        await expect_closed(channel)

        # a frame of garbage instead of msgpack: "bad_request", then hang up (framing is lost)
        for protocol in (INFERENCE_PROTOCOL, RPC_PROTOCOL):
            raw = await node.open_stream(pid, protocol)
            await raw.write(struct.pack(">I", 5) + b"\xc1" * 5)
            channel = FramedChannel(Libp2pByteStream(raw), wire.DEFAULT_MAX_FRAME)
            expect_error(await reply(channel), "bad_request")
            await expect_closed(channel)

        # well-framed but wrong requests on one RPC stream: an error each, the stream stays usable
        rpc = await open_channel(node, pid, RPC_PROTOCOL)
        wrong_width = random_hidden(hidden_size + 1, 3, seed=22)
        error = expect_error(await forward(rpc, model_id, start, end, wrong_width), "bad_request")
        assert str(hidden_size) in error.message
        error = expect_error(await forward(rpc, model_id, *outside, first), "out_of_range")
        assert f"{start}:{end}" in error.message
        expect_error(await forward(rpc, f"tiny@{'0' * 32}", start, end, first), "unknown_model")
        # tensors whose header lies: two dims instead of three, more elements than bytes sent
        for shape in ([3, hidden_size], [1, 5, hidden_size]):
            request = wire.Forward(model_id=model_id, start=start, end=end, hidden=first).to_wire()
            request["hidden"]["shape"] = shape
            await rpc.write_message(request)
            expect_error(await reply(rpc), "bad_request")
        expect_error(await call(rpc, wire.Step(hidden=first, step_id=0)), "bad_request")
        ok = await forward(rpc, model_id, start, end, first)
        assert isinstance(ok, wire.ForwardResult), ok
        torch.testing.assert_close(
            ok.hidden, ref.forward(first, start=start, end=end), atol=ATOL, rtol=ATOL
        )

        # sessions: out of range, unknown model, a cache larger than what is left, step first
        other = await open_channel(node, pid, INFERENCE_PROTOCOL)
        expect_error(await open_session(other, model_id, *outside), "out_of_range")
        expect_error(await open_session(other, "other@" + "1" * 32, start, end), "unknown_model")
        asked = CACHE_TOKENS
        error = expect_error(
            await open_session(other, model_id, start, end, max_length=asked), "cache_full"
        )
        free = opened.free_cache_tokens
        assert f"cache_full: {error.message}".startswith(
            f"cache_full: cache full: {free:,} tokens free, {asked:,} asked"
        ), error.message
        assert error.details == {"free": free, "asked": asked}
        fresh = await open_channel(node, pid, INFERENCE_PROTOCOL)
        expect_error(await call(fresh, wire.Step(hidden=first, step_id=0)), "unknown_session")
        # a second session on `other`: a wrong-shape step is refused and does not touch its cache
        opened2 = await open_session(other, model_id, start, end, max_length=8)
        assert isinstance(opened2, wire.SessionOpened), opened2
        expect_error(await call(other, wire.Step(hidden=wrong_width, step_id=0)), "bad_request")
        torch.testing.assert_close(await step(other, first, 1), out_first, atol=ATOL, rtol=ATOL)

        # streams cut in the middle of a message (one of them the second session's)
        raw = await raw_inference_stream()
        await raw.write(struct.pack(">I", 1000) + b"\x85" * 100)
        await raw.reset()
        await other.stream.send_all(struct.pack(">I", 1000) + b"\x85" * 10)
        await other.stream.reset()

        # the first session goes on as if nothing happened
        out_second = await step(session, second, 1)

        # and the server freed what the dead sessions held: only ours is left
        async def load():
            info = await call(rpc, wire.Info())
            assert isinstance(info, wire.InfoResult), info
            return info.load if info.load["sessions"] == 1 else None

        left = await wait_for(load, timeout=10)
        assert left and left["cache_tokens_free"] == CACHE_TOKENS - SESSION_LENGTH, left
        await session.write_message(wire.CloseSession().to_wire())
        return (start, end), out_first, out_second

    (start, end), out_first, out_second = run_peer(swarm, body)
    expected = ref.forward(torch.cat([first, second], dim=1), start=start, end=end)
    torch.testing.assert_close(out_first, expected[:, :3], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(out_second, expected[:, 3:], atol=ATOL, rtol=ATOL)
    for name, daemon in swarm["servers"].items():
        assert daemon.proc.poll() is None, f"{name} died:\n{daemon.log_tail()}"
        assert "request handler failed" not in daemon.log_text(), daemon.log_tail()


def test_max_sessions_gives_busy_and_idle_sessions_time_out(swarm):
    small_id, pid = swarm["small_id"], swarm["limits"].peer_id
    hidden = random_hidden(TinyLlama().hidden_size, 2, seed=30)

    async def body(node):
        record = await wait_for(lambda: node.get_record(pid), timeout=30)
        assert record and record.model_id == small_id and (record.start, record.end) == (0, 2)
        sessions = []
        for _ in range(LIMITS_MAX_SESSIONS):
            channel = await open_channel(node, pid, INFERENCE_PROTOCOL)
            assert isinstance(await open_session(channel, small_id, 0, 2), wire.SessionOpened)
            sessions.append(channel)
        extra = await open_channel(node, pid, INFERENCE_PROTOCOL)
        busy = expect_error(await open_session(extra, small_id, 0, 2), "busy")
        assert f"the limit is {LIMITS_MAX_SESSIONS}" in busy.message
        # closing one session makes room for another, on the stream that was refused
        await sessions.pop().write_message(wire.CloseSession().to_wire())

        async def reopened():
            answer = await open_session(extra, small_id, 0, 2)
            return answer if isinstance(answer, wire.SessionOpened) else None

        assert await wait_for(reopened, timeout=10)
        await extra.write_message(wire.CloseSession().to_wire())
        await sessions[0].write_message(wire.CloseSession().to_wire())

        # an idle session is closed with a "timeout" error once it has been silent long enough
        idle = await open_channel(node, pid, INFERENCE_PROTOCOL)
        assert isinstance(await open_session(idle, small_id, 0, 2), wire.SessionOpened)
        await step(idle, hidden, 0)
        began = time.monotonic()
        timeout = expect_error(await reply(idle, timeout=LIMITS_IDLE + 15), "timeout")
        waited = time.monotonic() - began
        await expect_closed(idle)
        return timeout, waited

    timeout, waited = run_peer(swarm, body)
    assert f"{LIMITS_IDLE:.0f} s" in timeout.message
    assert LIMITS_IDLE - 0.5 <= waited <= LIMITS_IDLE + 10, waited


def test_serve_without_a_swarm_says_what_to_do(tmp_path):
    from cli.main import cli

    model = write_tiny_llama(tmp_path / "tiny", TinyLlama(num_layers=NUM_BLOCKS))
    result = CliRunner().invoke(cli, ["serve", str(model), "--home", str(tmp_path / "home")])
    assert result.exit_code == 2, result.output
    assert "--initial-peers" in result.output and "--new-swarm" in result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback


def test_serve_blocks_outside_the_model_is_a_clear_error(tmp_path):
    from cli.main import cli

    model = write_tiny_llama(tmp_path / "tiny", TinyLlama(num_layers=NUM_BLOCKS))
    args = ["serve", str(model), "--home", str(tmp_path / "home"), "--new-swarm"]
    result = CliRunner().invoke(cli, [*args, "--host", "127.0.0.1", "--blocks", "5:99"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--blocks'" in result.output, result.output
    assert "5:99" in result.output and f"has {NUM_BLOCKS} blocks" in result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    result = CliRunner().invoke(cli, [*args, "--blocks", "6:3"])
    assert result.exit_code == 2 and "A < B" in result.output, result.output
    bare = ["serve", str(tmp_path), "--home", str(tmp_path / "home"), "--new-swarm"]
    result = CliRunner().invoke(cli, [*bare, "--blocks", "0:2"])
    assert result.exit_code == 2 and "no config.json" in result.output, result.output


def test_killed_server_vanishes_and_sigterm_exits_cleanly(swarm):
    model_id = swarm["model_id"]
    victim, stopped = swarm["servers"]["s1"], swarm["servers"]["s2"]

    async def body(node):
        for peer_id in (victim.peer_id, stopped.peer_id):
            assert await wait_for(partial(node.get_record, peer_id), timeout=30)
        victim.kill()  # SIGKILL: no OFFLINE announcement, the record must expire by itself
        killed = time.monotonic()
        stopped.proc.terminate()  # SIGTERM: announce OFFLINE, close sessions, exit 0
        code = await trio.to_thread.run_sync(stopped.proc.wait, 15)
        exited = time.monotonic() - killed
        polled = []

        async def gone():
            polled.append(time.monotonic() - killed)
            listed = {r.peer_id for r in await node.list_servers(model_id)}
            return not listed & {victim.peer_id, stopped.peer_id}

        assert await wait_for(gone, timeout=30, interval=0.2)
        vanished = polled[-1]

        # one listing may miss a live record; once expired, no listing or lookup may return it
        await trio.sleep(max(0.0, killed + 2 * PERIOD + 1.0 - time.monotonic()))
        later = {r.peer_id for r in await node.list_servers(model_id)}
        expired = await node.get_record(victim.peer_id)
        offline = await node.get_record(stopped.peer_id)
        return vanished, code, exited, later, expired, offline

    vanished, code, exited, later, expired, offline = run_peer(swarm, body)
    assert victim.proc.returncode == -9
    assert code == 0, f"exit status {code}:\n{stopped.log_tail()}"
    assert exited < 10.0, f"SIGTERM took {exited:.1f} s (a busy machine is slow; a hang is not)"
    assert "shutting down" in stopped.log_text()
    # the killed server's record lives two periods from its last announcement (before the
    # kill); the listing that first missed it started within one listing of its expiry
    assert vanished <= 2 * PERIOD + 4.0, f"records of stopped servers lingered {vanished:.1f} s"
    assert not later & {victim.peer_id, stopped.peer_id}
    assert expired is None
    assert offline is None or offline.state is State.OFFLINE

"""Network benchmark: a libp2p stream between two processes vs plain trio TCP, same run.

Three processes on loopback: a relay/bootstrap peer R, a target peer T that serves an echo
protocol (and a plain trio TCP echo server), and this process, the client C. Measured:

- small-message round trip (16 B and 16 KiB, framed, on one long-lived stream): libp2p
  (TCP + Noise + yamux) direct to T, and plain TCP to T; ratio = libp2p / TCP;
- the same through the circuit relay R (T also holds a reservation on R; DCUtR is off so the
  relayed connection stays relayed);
- 4 MiB messages: MiB/s sent C -> T and acknowledged, each way of reaching T;
- connect and new-stream times.

    python -m benchmarks.bench_net [--rounds 300] [--big 8]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ECHO = "/peerd/bench-echo/1.0.0"
HEADER = struct.Struct(">I")
BIG = 4 * 1024 * 1024


# ---- framing over a libp2p stream or a trio stream ----


class Framed:
    def __init__(self, send, recv) -> None:
        self._send, self._recv, self._buf = send, recv, bytearray()

    async def send(self, payload: bytes) -> None:
        await self._send(HEADER.pack(len(payload)) + payload)

    async def recv(self) -> bytes:
        (n,) = HEADER.unpack(await self._exactly(4))
        return await self._exactly(n)

    async def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = await self._recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise EOFError
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def framed_libp2p(stream) -> Framed:
    return Framed(stream.write, stream.read)


def framed_tcp(stream: trio.SocketStream) -> Framed:
    return Framed(stream.send_all, stream.receive_some)


async def echo_loop(f: Framed) -> None:
    """Echo small frames; answer a big one (over 64 KiB) with its length only."""
    try:
        while True:
            msg = await f.recv()
            await f.send(msg if len(msg) <= 65536 else HEADER.pack(len(msg)))
    except Exception:
        pass


# ---- helper processes ----


def node_config(home: Path, **kw):
    from peerd.config import NodeConfig

    return NodeConfig(home=home, host="127.0.0.1", announce_period=30.0, dcutr=False, **kw)


async def role_relay(home: Path) -> None:
    from peerd.node import Node

    node = Node(node_config(home, new_swarm=True))
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        print(json.dumps({"addrs": [str(a) for a in node.host.get_addrs()]}), flush=True)
        await trio.sleep_forever()


async def role_target(home: Path, initial: str) -> None:
    from peerd.node import Node

    node = Node(node_config(home, initial_peers=[initial], reachability="private"))

    async def handler(stream) -> None:
        await echo_loop(framed_libp2p(stream))

    async def tcp_handler(stream: trio.SocketStream) -> None:
        await echo_loop(framed_tcp(stream))

    node.set_stream_handler(ECHO, handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, tcp_handler, 0, host="127.0.0.1")
        )
        tcp_port = listeners[0].socket.getsockname()[1]
        print(
            json.dumps(
                {
                    "peer_id": node.peer_id,
                    "addrs": [str(a) for a in node.host.get_addrs()],
                    "relay_addrs": node.relay_addrs,
                    "tcp_port": tcp_port,
                }
            ),
            flush=True,
        )
        await trio.sleep_forever()


# ---- measurements ----


async def round_trips(f: Framed, size: int, rounds: int) -> list[float]:
    payload = os.urandom(size)
    for _ in range(20):  # warm-up
        await f.send(payload)
        await f.recv()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        await f.send(payload)
        await f.recv()
        out.append(time.perf_counter() - t)
    return out


async def throughput(f: Framed, count: int) -> float:
    """MiB/s of `count` 4 MiB messages, each acknowledged before the next is sent."""
    payload = os.urandom(BIG)
    await f.send(payload)
    await f.recv()
    t = time.perf_counter()
    for _ in range(count):
        await f.send(payload)
        await f.recv()
    return count * BIG / (time.perf_counter() - t) / 2**20


def ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


async def client(home: Path, relay: dict, target: dict, rounds: int, big: int) -> dict:
    from libp2p.peer.id import ID

    from peerd.node import Node

    node = Node(node_config(home, initial_peers=[relay["addrs"][0]]))
    results: dict = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        pid = ID.from_base58(target["peer_id"])
        direct = [a for a in target["addrs"] if "/p2p-circuit" not in a]

        t = time.perf_counter()
        stream = await node.open_stream(target["peer_id"], ECHO, addrs=direct)
        results["connect_and_stream_ms"] = (time.perf_counter() - t) * 1000
        opens = []
        for _ in range(20):
            t = time.perf_counter()
            s = await node.host.new_stream(pid, [ECHO])
            opens.append(time.perf_counter() - t)
            await s.close()
        results["new_stream_ms"] = ms(opens)

        tcp = await trio.open_tcp_stream("127.0.0.1", target["tcp_port"])
        lp, tf = framed_libp2p(stream), framed_tcp(tcp)
        for size in (16, 16384):
            a = await round_trips(lp, size, rounds)
            b = await round_trips(tf, size, rounds)
            results[f"rtt_{size}B"] = {"libp2p_ms": ms(a), "tcp_ms": ms(b), "ratio": ms(a) / ms(b)}
        a, b = await throughput(lp, big), await throughput(tf, big)
        results["4MiB"] = {"libp2p_MiBps": a, "tcp_MiBps": b, "ratio": b / a}
        await stream.close()
        await tcp.aclose()

        # through the relay: drop the direct connection, dial the circuit address
        await node.host.disconnect(pid)
        await trio.sleep(0.2)
        t = time.perf_counter()
        assert await node.relay.dial(pid, target["relay_addrs"]), "relayed dial failed"
        relayed = await node.host.new_stream(pid, [ECHO])
        results["relayed_connect_and_stream_ms"] = (time.perf_counter() - t) * 1000
        conns = node.host.get_network().get_connections(pid)
        results["relayed_connection"] = [str(a) for c in conns for a in c.get_transport_addresses()]
        rf = framed_libp2p(relayed)
        r = await round_trips(rf, 16, rounds)
        results["relay_rtt_16B"] = {
            "relay_ms": ms(r),
            "direct_libp2p_ms": results["rtt_16B"]["libp2p_ms"],
            "ratio": ms(r) / results["rtt_16B"]["libp2p_ms"],
        }
        results["relay_4MiB_MiBps"] = await throughput(rf, max(1, big // 2))
        await relayed.close()
        await node.shutdown()
        nursery.cancel_scope.cancel()
    return results


def spawn(role: str, home: Path, *extra: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_net", "--role", role, "--home", str(home), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError(f"{role} helper died before printing its addresses")
    return proc, json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=["client", "relay", "target"], default="client")
    parser.add_argument("--home")
    parser.add_argument("--initial-peers")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--big", type=int, default=8, help="4 MiB messages per throughput run")
    args = parser.parse_args()
    from peerd.logging import setup_logging

    setup_logging("WARNING")
    if args.role == "relay":
        trio.run(role_relay, Path(args.home))
        return
    if args.role == "target":
        trio.run(role_target, Path(args.home), args.initial_peers)
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        procs = []
        try:
            relay_proc, relay = spawn("relay", root / "relay")
            procs.append(relay_proc)
            target_proc, target = spawn(
                "target", root / "target", "--initial-peers", relay["addrs"][0]
            )
            procs.append(target_proc)
            results = trio.run(client, root / "client", relay, target, args.rounds, args.big)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    print(json.dumps(results, indent=1))
    r = results
    print(
        f"\nround trip 16 B:    libp2p {r['rtt_16B']['libp2p_ms']:.2f} ms  vs TCP {r['rtt_16B']['tcp_ms']:.3f} ms"
        f"  (x{r['rtt_16B']['ratio']:.1f})\n"
        f"round trip 16 KiB:  libp2p {r['rtt_16384B']['libp2p_ms']:.2f} ms  vs TCP {r['rtt_16384B']['tcp_ms']:.3f} ms"
        f"  (x{r['rtt_16384B']['ratio']:.1f})\n"
        f"4 MiB messages:     libp2p {r['4MiB']['libp2p_MiBps']:.1f} MiB/s vs TCP {r['4MiB']['tcp_MiBps']:.1f} MiB/s"
        f"  (TCP x{r['4MiB']['ratio']:.1f})\n"
        f"through the relay:  16 B round trip {r['relay_rtt_16B']['relay_ms']:.2f} ms"
        f" (x{r['relay_rtt_16B']['ratio']:.1f} direct libp2p), 4 MiB {r['relay_4MiB_MiBps']:.1f} MiB/s\n"
        f"connect+stream {r['connect_and_stream_ms']:.0f} ms, new stream {r['new_stream_ms']:.1f} ms, "
        f"relayed connect+stream {r['relayed_connect_and_stream_ms']:.0f} ms"
    )


if __name__ == "__main__":
    main()

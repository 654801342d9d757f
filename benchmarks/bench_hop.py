"""Per-hop benchmark (issue 4): one server hop over a libp2p stream vs the same compute in-process.

One `peerd serve MODEL --blocks 0:1 --new-swarm` process; this process is the client, with an
in-process `peerd.node.Node` speaking the wire protocol (`OpenSession`/`Step` on the inference
protocol, `Forward` on the RPC protocol) over long-lived framed streams. Interleaved with every
remote call, the same compute runs here on the same weights (block 0, one torch thread each):

- inference step: one token through one block against a KV cache of `context` tokens:
  round trip over the stream vs in-process `LoadedBlocks.step` (ratio, and the overhead in ms);
- the same stream's floor: a `Ping` frame answered by the server's session loop;
- forward: a (1, 128, hidden) float32 tensor through one block; besides the ratio, the
  per-hop transfer rate in MB/s = bytes both ways / (round trip - in-process compute);
- CPU per step: the server process's (from /proc, its idle use taken out) and this client's,
  beside the in-process compute's.

    python -m benchmarks.bench_hop [--quick] [--rounds 200] [--blocks 1] [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
import uuid
from pathlib import Path

import torch
import trio

import wire
from benchmarks.common import (
    Setup,
    cpu_seconds,
    limit_threads,
    load_average,
    median,
    model_dir_for,
    setup_for,
    table,
    write_json,
)
from blocks import LoadedBlocks
from peerd.config import NodeConfig
from peerd.node import Node
from peerd.server.block_server import INFERENCE_PROTOCOL, RPC_PROTOCOL
from peerd.swarm import SwarmAccess
from tests.launcher import DaemonProcess
from tests.launcher import HarnessGroup as DaemonGroup

CONTEXT = 64  # tokens already in the KV cache when the one-token steps are timed
IDLE_S = 2.0  # how long the idle server's background CPU use is measured


async def _timed(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = await fn()
    return out, time.perf_counter() - t0


def _local(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


async def _request(channel, message: wire.Message) -> wire.Message:
    await channel.write_message(message.to_wire())
    reply = wire.parse_message(await channel.read_message())
    if isinstance(reply, wire.Error):
        raise RuntimeError(f"server error {reply.code}: {reply.message}")
    return reply


async def _server_record(node: Node, peer_id: str, timeout: float = 60.0):
    with trio.fail_after(timeout):
        while True:
            for record in await node.list_servers(None):
                if record.peer_id == peer_id and record.state.value == "ONLINE":
                    return record
            await trio.sleep(0.2)


async def measure(
    home: Path, server: DaemonProcess, span: LoadedBlocks, rounds: int, seq_len: int
) -> dict:
    """Everything measured from the in-process client node."""
    node = Node(
        NodeConfig(
            home=home,
            host="127.0.0.1",
            initial_peers=[server.addrs[0]],
            reachability="public",
            announce_period=30.0,
            dcutr=False,
        ),
        out=None,
    )
    out: dict = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        try:
            swarm = SwarmAccess(node, max_frame=wire.DEFAULT_MAX_FRAME, cache_dir=home / "cache")
            record = await _server_record(node, server.peer_id)
            out["step"], out["ping"], out["stream_open_ms"] = await _steps(
                swarm, record, span, rounds, server.pid
            )
            out["forward"] = await _forwards(swarm, record, span, max(5, rounds // 5), seq_len)
        finally:
            await node.shutdown()
            nursery.cancel_scope.cancel()
    return out


async def _steps(
    swarm: SwarmAccess, record, span: LoadedBlocks, rounds: int, server_pid: int
) -> tuple[dict, dict, float]:
    h = span.config.hidden_size
    g = torch.Generator().manual_seed(0)
    warmup = 20
    max_length = CONTEXT + rounds + warmup + 10
    channel, open_s = await _timed(lambda: swarm.connect(record.peer_id, INFERENCE_PROTOCOL))
    await _request(
        channel,
        wire.OpenSession(
            model_id=record.model_id,
            start=span.start,
            end=span.end,
            max_length=max_length,
            batch_size=1,
            compression="none",
            session_id=uuid.uuid4().hex,
        ),
    )
    cache = span.new_cache(1, max_length)
    prefill = torch.randn(1, CONTEXT, h, generator=g)
    await _request(channel, wire.Step(hidden=prefill, step_id=0))
    span.step(prefill, cache)
    step_id = 0

    async def remote_step(x: torch.Tensor) -> wire.Message:
        nonlocal step_id
        step_id += 1
        return await _request(channel, wire.Step(hidden=x, step_id=step_id))

    for _ in range(warmup):
        x = torch.randn(1, 1, h, generator=g)
        await remote_step(x)
        span.step(x, cache)
    # the server's background CPU (announcements, DHT upkeep), to take out of its per-step CPU
    idle_before, t_idle = cpu_seconds(server_pid), time.perf_counter()
    await trio.sleep(IDLE_S)
    idle_rate = (cpu_seconds(server_pid) - idle_before) / (time.perf_counter() - t_idle)

    remote, local, client_cpu, local_cpu = [], [], [], []
    server_before, t_loop = cpu_seconds(server_pid), time.perf_counter()
    for i in range(rounds):
        x = torch.randn(1, 1, h, generator=g)
        c0, t0 = time.process_time(), time.perf_counter()
        reply = await remote_step(x)
        remote.append(time.perf_counter() - t0)
        client_cpu.append(time.process_time() - c0)
        c0, t0 = time.process_time(), time.perf_counter()
        expected = span.step(x, cache)
        local.append(time.perf_counter() - t0)
        local_cpu.append(time.process_time() - c0)
        if i == 0:
            diff = float((reply.hidden - expected).abs().max())
    loop_s = time.perf_counter() - t_loop
    server_cpu = (cpu_seconds(server_pid) - server_before - idle_rate * loop_s) / rounds
    pings = []
    for i in range(rounds):
        _, pt = await _timed(lambda i=i: _request(channel, wire.Ping(nonce=i)))
        pings.append(pt)
    await channel.write_message(wire.CloseSession().to_wire())
    await channel.aclose()
    step = {
        "remote_ms": median(remote) * 1e3,
        "local_ms": median(local) * 1e3,
        "ratio": median(remote) / median(local),
        "overhead_ms": (median(remote) - median(local)) * 1e3,
        "local_cpu_ms": median(local_cpu) * 1e3,
        "server_cpu_ms": server_cpu * 1e3,
        "server_overhead_cpu_ms": (server_cpu - median(local_cpu)) * 1e3,
        "client_cpu_ms": median(client_cpu) * 1e3,
        "server_idle_cpu_percent": idle_rate * 100,
        "max_abs_diff": diff,
        "rounds": rounds,
        "context": CONTEXT,
    }
    return step, {"stream_ping_ms": median(pings) * 1e3}, open_s * 1e3


async def _forwards(
    swarm: SwarmAccess, record, span: LoadedBlocks, rounds: int, seq_len: int
) -> dict:
    h = span.config.hidden_size
    x = torch.randn(1, seq_len, h, generator=torch.Generator().manual_seed(1))
    channel = await swarm.connect(record.peer_id, RPC_PROTOCOL)
    remote, local = [], []
    message = wire.Forward(model_id=record.model_id, start=span.start, end=span.end, hidden=x)
    for i in range(rounds + 2):
        reply, dt = await _timed(lambda: _request(channel, message))
        lt = _local(lambda: span.forward(x))
        if i >= 2:
            remote.append(dt)
            local.append(lt)
    await channel.aclose()
    nbytes = 2 * x.numel() * x.element_size()  # there and back
    net = median(remote) - median(local)
    return {
        "shape": list(x.shape),
        "bytes_both_ways": nbytes,
        "remote_ms": median(remote) * 1e3,
        "local_ms": median(local) * 1e3,
        "ratio": median(remote) / median(local),
        "overhead_ms": net * 1e3,
        "transfer_MBps": nbytes / net / 1e6 if net > 0 else float("nan"),
        "max_abs_diff": float((reply.hidden - span.forward(x)).abs().max()),
    }


def run(setup: Setup, model_dir: Path, workdir: Path, rounds: int, blocks: int = 1) -> dict:
    """Serve blocks [0, blocks) (one block for the reference figures) and measure one hop."""
    limit_threads(setup.threads)
    results: dict = {"load_before": load_average(), "blocks": blocks}
    span = LoadedBlocks.load(model_dir, 0, blocks)
    with DaemonGroup(
        workdir / "hop", announce_period=setup.announce_period, threads=setup.threads
    ) as group:
        server = group.start(
            "hop-server",
            str(model_dir),
            "--blocks",
            f"0:{blocks}",
            "--new-swarm",
            "--rebalance-period",
            "0",
            command="serve",
        )
        server.wait_online()
        results.update(
            trio.run(measure, workdir / "hop-client", server, span, rounds, setup.seq_len)
        )
    results["load_after"] = load_average()
    return results


def report(r: dict) -> str:
    s, f = r["step"], r["forward"]
    rows = [
        [
            "inference step (1 token)",
            s["remote_ms"],
            s["local_ms"],
            s["ratio"],
            s["overhead_ms"],
            "-",
        ],
        [
            f"forward {tuple(f['shape'])}",
            f["remote_ms"],
            f["local_ms"],
            f["ratio"],
            f["overhead_ms"],
            f["transfer_MBps"],
        ],
        ["Ping on the session stream", r["ping"]["stream_ping_ms"], "-", "-", "-", "-"],
    ]
    cpu = table(
        "   CPU ms per inference step (server: idle use taken out)",
        ["in-process compute", "server process", "server overhead", "client (node + codec)"],
        [[s["local_cpu_ms"], s["server_cpu_ms"], s["server_overhead_cpu_ms"], s["client_cpu_ms"]]],
    )
    return (
        table(
            f"5. one hop over libp2p (loopback) vs in-process, {r['blocks']} block(s), medians; "
            f"stream open {r['stream_open_ms']:.1f} ms",
            ["request", "stream ms", "in-process ms", "ratio", "overhead ms", "transfer MB/s"],
            rows,
        )
        + "\n"
        + cpu
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small model and few rounds: a smoke run"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed inference steps (default 200, quick 20)"
    )
    parser.add_argument(
        "--blocks", type=int, default=1, help="blocks the server holds and each request runs"
    )
    parser.add_argument("--out", type=Path, help="write every figure to this JSON file")
    parser.add_argument(
        "--model-cache", type=Path, help="keep the generated checkpoint here between runs"
    )
    args = parser.parse_args(argv)
    setup = setup_for(args.quick)
    limit_threads(setup.threads)
    from peerd.logging import setup_logging

    setup_logging("WARNING")  # py-libp2p's routine errors stay quiet in this process too
    rounds = args.rounds or (20 if args.quick else 200)
    blocks = args.blocks
    with tempfile.TemporaryDirectory(prefix="peerd-bench-hop-") as tmp:
        model_dir = model_dir_for(setup, args.model_cache or Path(tmp) / "models")
        results = run(setup, model_dir, Path(tmp), rounds, blocks)
    results["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(report(results))
    write_json(args.out, results)


if __name__ == "__main__":
    main()

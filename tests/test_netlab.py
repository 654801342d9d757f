"""The network lab (tests/netlab.py) emulates what it says: latency, bandwidth, no bypass.

Two nodes 25 ms apart (one way). Raw sockets first: an echo through the relay takes one round
trip, a megabyte takes as long as the tbf rate says, and the daemon's own port cannot be
reached from the other node. Then real peers: a libp2p ping on an open stream between a
daemon and a peer of the lab takes 2 × 25 ms, over a connection to the relay's address.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest

from tests.launcher import HarnessGroup
from tests.netlab import REPO, LabUnavailable, NetLab, in_netns, lab_unavailable_reason

pytestmark = pytest.mark.slow

ONE_WAY_MS = 25.0
RATE = "20mbit"
SLACK_MS = 8.0  # what Python, Noise and yamux add to a round trip on a busy small machine


@pytest.fixture(scope="module")
def lab():
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    try:
        with NetLab(["a", "b"], latency_ms=ONE_WAY_MS, bandwidth=RATE) as lab:
            yield lab
    except LabUnavailable as exc:
        pytest.skip(f"no network lab on this machine: {exc}")


def _serve_once(listener: socket.socket, handle) -> threading.Thread:
    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            handle(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _listen_as_daemon(lab: NetLab, name: str) -> socket.socket:
    """A socket where `name`'s daemon would listen: its own loopback, inside its namespace."""
    node = lab.nodes[name]
    with in_netns(node.netns):
        listener = socket.create_server(("127.0.0.1", node.daemon_port))
    listener.settimeout(10)
    return listener


def _connect_from(lab: NetLab, name: str, host: str, port: int) -> socket.socket:
    with in_netns(lab.nodes[name].netns):
        sock = socket.socket()
    sock.settimeout(10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.connect((host, port))
    return sock


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(1 << 16):
        conn.sendall(data)


def test_relay_delays_each_round_trip_and_hides_the_daemon_port(lab):
    b = lab.nodes["b"]
    with _listen_as_daemon(lab, "b") as listener:
        server = _serve_once(listener, _echo)
        with _connect_from(lab, "a", b.ip, b.relay_port) as sock:
            rtts = []
            for _ in range(5):
                began = time.perf_counter()
                sock.sendall(b"x" * 32)
                got = b""
                while len(got) < 32:
                    got += sock.recv(64)
                rtts.append((time.perf_counter() - began) * 1000)
        server.join(5)
    assert min(rtts) >= 2 * ONE_WAY_MS - 1, rtts
    assert statistics.median(rtts) <= 2 * ONE_WAY_MS + SLACK_MS, rtts
    with pytest.raises(OSError):  # nothing outside b's namespace reaches its daemon's port
        _connect_from(lab, "a", b.ip, b.daemon_port).close()


def test_tbf_caps_the_bandwidth(lab):
    b = lab.nodes["b"]
    size = 1 << 20
    received = []

    def sink(conn: socket.socket) -> None:
        total = 0
        while data := conn.recv(1 << 16):
            total += len(data)
        received.append(total)
        conn.sendall(b"done")

    with _listen_as_daemon(lab, "b") as listener:
        server = _serve_once(listener, sink)
        with _connect_from(lab, "a", b.ip, b.relay_port) as sock:
            began = time.perf_counter()
            sock.sendall(b"y" * size)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(16) == b"done"
            seconds = time.perf_counter() - began
        server.join(5)
    assert received == [size]
    ideal = size * 8 / 20e6 + 2 * ONE_WAY_MS / 1000
    assert 0.85 * ideal <= seconds <= 2.0 * ideal, (seconds, ideal)


def test_ping_between_peers_takes_the_emulated_round_trip(lab, tmp_path):
    with HarnessGroup(tmp_path, announce_period=2.0) as group:
        boot = lab.spawn(group, "b", "boot", "--new-swarm").wait_ready()
        assert lab.addr("b", boot.peer_id) in boot.addrs or any(
            lab.nodes["b"].public_addr in a for a in boot.addrs
        ), boot.addrs
        probe = subprocess.run(
            [
                *lab.prefix("a"),
                sys.executable,
                "-m",
                "tests.netlab",
                "ping",
                "--home",
                str(tmp_path / "probe"),
                *lab.daemon_args("a"),
                "--initial-peers",
                lab.addr("b", boot.peer_id),
                "--target",
                boot.peer_id,
                "--count",
                "8",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    rtts = [r * 1000 for r in result["rtts"]]
    assert min(rtts) >= 2 * ONE_WAY_MS - 1, rtts
    assert statistics.median(rtts) <= 2 * ONE_WAY_MS + SLACK_MS, rtts
    relay = lab.nodes["b"].public_addr
    assert result["remote_addrs"] and all(a.startswith(relay) for a in result["remote_addrs"]), (
        result["remote_addrs"]
    )

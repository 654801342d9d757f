"""Reaching a peer behind a firewall only through a circuit relay, across network namespaces.

Topology (made here, deleted in `finally`; skipped where network namespaces are not allowed):

    ns B (probe) 10.R.1.2 ──veth── 10.R.1.1 ns R (relay, bootstrap) 10.R.2.1 ──veth── 10.R.2.2 ns C (server)

R does not forward packets, so B has no route to C's subnet at all; C accepts no inbound
connection either (it listens on its own loopback only, as a firewall would allow) and dials
out to R. C must find out it is unreachable, reserve a slot on R and announce its
/p2p-circuit address; B then finds C's record in the DHT and pings it through R.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.netharness import REPO, DaemonGroup

pytestmark = pytest.mark.slow

PERIOD = 2.0
MODEL = "relayed@c0ffee"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespaces():
    tag = f"{os.getpid() % 100000}"
    net = 10 + os.getpid() % 200  # 10.<net>.x.y, different per test process
    names = {"b": f"pdB{tag}", "r": f"pdR{tag}", "c": f"pdC{tag}"}
    created = []
    try:
        for ns in names.values():
            ip("netns", "add", ns)
            created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for side, subnet in (("b", 1), ("c", 2)):
            r_end, other_end = f"r{side}{tag}", f"{side}r{tag}"
            ip(
                "link",
                "add",
                r_end,
                "netns",
                names["r"],
                "type",
                "veth",
                "peer",
                "name",
                other_end,
                "netns",
                names[side],
            )
            ip("-n", names["r"], "addr", "add", f"10.{net}.{subnet}.1/24", "dev", r_end)
            ip("-n", names[side], "addr", "add", f"10.{net}.{subnet}.2/24", "dev", other_end)
            ip("-n", names["r"], "link", "set", r_end, "up")
            ip("-n", names[side], "link", "set", other_end, "up")
        subprocess.run(
            ["ip", "netns", "exec", names["r"], "sysctl", "-qw", "net.ipv4.ip_forward=0"],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (subprocess.CalledProcessError, FileNotFoundError, PermissionError) as exc:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        pytest.skip(f"network namespaces are not available here: {exc}")
    try:
        yield names, net
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_peer_behind_firewall_is_reached_through_a_relay(namespaces, tmp_path):
    names, net = namespaces
    with DaemonGroup(tmp_path, announce_period=PERIOD) as group:
        relay = group.start("relay", "--new-swarm", netns=names["r"], host="0.0.0.0")
        relay_for = {s: next(a for a in relay.addrs if f"/10.{net}.{s}.1/" in a) for s in (1, 2)}
        server = group.start(
            "server",
            "--initial-peers",
            relay_for[2],
            "--test-record",
            f"{MODEL}:0:2",
            netns=names["c"],
            host="127.0.0.1",
        )
        assert server.relay_addrs, f"no relayed address in the ready file:\n{server.log_tail()}"
        assert all("/p2p-circuit/" in a and relay.peer_id in a for a in server.relay_addrs)
        assert "reservation on relay" in server.log_path.read_text()

        probe = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                names["b"],
                sys.executable,
                "-m",
                "tests.netprobe",
                "--initial-peers",
                relay_for[1],
                "--home",
                str(tmp_path / "probe"),
                "--target",
                server.peer_id,
                "--direct",
                f"10.{net}.2.2:{server.addrs[0].split('/tcp/')[1].split('/')[0]}",
                "--period",
                str(PERIOD),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert probe.returncode == 0, probe.stderr[-3000:]
        result = json.loads(probe.stdout.strip().splitlines()[-1])

    record = result["record"]
    assert record is not None, probe.stderr[-3000:]
    assert record["using_relay"] and record["model_id"] == MODEL
    assert record["addrs"] and all("/p2p-circuit/" in a for a in record["addrs"])
    assert server.peer_id in result["listed"]
    assert result["direct_tcp"].startswith("failed"), (
        "the probe could reach the server's subnet directly"
    )
    assert len(result["rtts"]) == 3 and all(0 < r < 2.0 for r in result["rtts"])
    assert result["connection_addrs"] and all(
        "/p2p-circuit" in a for a in result["connection_addrs"]
    )

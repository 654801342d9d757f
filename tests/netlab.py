"""A network lab for real daemons: namespaces, emulated latency and bandwidth, no bypass.

This kernel has no `netem`, so latency comes from a delaying TCP relay in front of each node:

    ns <node> ─ lab0 10.N.0.i ── bridge in ns <hub> ── 10.N.0.j lab0 ─ ns <other node>
      daemon listens on 127.0.0.1:DAEMON_PORT+i only (nothing outside its namespace reaches it)
      relay  listens on 10.N.0.i:RELAY_PORT+i and forwards to it, each byte delayed

Each daemon advertises its relay address (`--announce-addr`); the addresses it also learns to
others through identify (127.0.0.1:port) lead nowhere from another namespace, so every
connection between two nodes crosses exactly one relay, whichever side dialed. The relay picks
the one-way delay by the connecting node's address (a latency per pair of nodes) and applies it
in both directions, preserving order: a round trip takes twice the pair's latency. Bandwidth is
`tc tbf` on both ends of each node's link (its upload and its download). Only iproute2 is needed.
A daemon restarted on a node may listen on another of its port slots (`slot=`): its old port
keeps TIME_WAIT connections for a minute, and the relay finds it on whichever slot it is.

    with NetLab(["boot", "a", "b"], latency_ms=25, bandwidth="100mbit") as lab:
        with HarnessGroup(tmp_path) as group:
            boot = lab.spawn(group, "boot", "boot", "--new-swarm").wait_ready()
            peer = lab.spawn(group, "a", "a", "--initial-peers", lab.addr("boot", boot.peer_id))

One relay process (tests/netlab_relay.py) serves every node of a lab; `in_netns` makes sockets
inside a node's namespace from any process. `python -m tests.netlab ping ...` is a one-shot
peer that pings another from inside the lab.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.netlab_relay import in_netns

__all__ = [
    "PORT_SLOTS",
    "LabNode",
    "LabUnavailable",
    "NetLab",
    "in_netns",
    "lab_unavailable_reason",
]

REPO = Path(__file__).resolve().parents[1]
DAEMON_PORT = 21000  # + node index: distinct, so a learnt 127.0.0.1 address never finds a peer
PORT_SLOTS = 8  # a restarted daemon may take the next slot (+ k * SLOT_STRIDE): its old port
SLOT_STRIDE = 250  # has TIME_WAIT connections for a minute; the relay tries every slot
RELAY_PORT = 31000  # + node index
_counter = iter(range(1_000_000))


class LabUnavailable(RuntimeError):
    """Network namespaces, veth pairs, bridges or tbf cannot be made on this machine."""


def ip(*args: str) -> None:
    run_checked(["ip", *args])


def run_checked(cmd: Sequence[str]) -> None:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise LabUnavailable(f"{' '.join(cmd)}: {done.stderr.strip()}")


@dataclass(frozen=True)
class LabNode:
    name: str
    index: int
    netns: str
    ip: str

    @property
    def daemon_port(self) -> int:
        return self.slot_port(0)

    def slot_port(self, slot: int) -> int:
        """The daemon's port in `slot` (0..PORT_SLOTS-1): a restart may move to another one."""
        if not 0 <= slot < PORT_SLOTS:
            raise ValueError(f"slot must be in 0..{PORT_SLOTS - 1}, got {slot}")
        return DAEMON_PORT + self.index + slot * SLOT_STRIDE

    @property
    def relay_port(self) -> int:
        return RELAY_PORT + self.index

    @property
    def public_addr(self) -> str:
        """The address other nodes reach this one at (through its relay)."""
        return f"/ip4/{self.ip}/tcp/{self.relay_port}"


@dataclass
class NetLab:
    """Namespaces for `names` on one bridge, a relay in front of each, optional bandwidth cap.

    `latency_ms`: one-way latency of every pair, unless `set_latency` gave that pair another.
    `bandwidth`: a tc rate ("50mbit") for each node's upload and download, None for no cap.
    """

    names: Sequence[str]
    latency_ms: float = 25.0
    bandwidth: str | None = None
    workdir: Path | None = None  # the relay's config and log (default: a temporary folder)
    nodes: dict[str, LabNode] = field(init=False, default_factory=dict)
    _pairs: dict[frozenset[str], float] = field(init=False, default_factory=dict)
    _created: list[str] = field(init=False, default_factory=list)
    _relay: subprocess.Popen | None = field(init=False, default=None)
    _relay_log: Any = field(init=False, default=None)
    _temporary: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names) or not 0 < len(self.names) < 250:
            raise ValueError(f"need 1..249 distinct node names, got {list(self.names)}")
        tag = f"{os.getpid() % 100000}x{next(_counter)}"
        self.hub = f"lab{tag}-hub"
        net = 10 + os.getpid() % 200
        for i, name in enumerate(self.names, start=1):
            self.nodes[name] = LabNode(name, i, f"lab{tag}-{name}", f"10.{net}.0.{i}")

    # ----- configuration ------------------------------------------------------------
    def set_latency(self, a: str, b: str, one_way_ms: float) -> None:
        """One-way latency between nodes a and b (both directions); before `up`."""
        if self._relay is not None:
            raise RuntimeError("set latencies before the lab is up")
        self._pairs[frozenset((self.nodes[a].name, self.nodes[b].name))] = float(one_way_ms)

    def latency(self, a: str, b: str) -> float:
        """One-way latency between a and b in ms (a round trip takes twice as long)."""
        if a == b:
            return 0.0
        return self._pairs.get(frozenset((a, b)), self.latency_ms)

    # ----- lifecycle ----------------------------------------------------------------
    def up(self) -> NetLab:
        try:
            self._make_namespaces()
            self._start_relay()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        if self._relay is not None:
            if self._relay.poll() is None:
                self._relay.send_signal(signal.SIGTERM)
                try:
                    self._relay.wait(5)
                except subprocess.TimeoutExpired:
                    self._relay.kill()
                    self._relay.wait(5)
            self._relay = None
        if self._relay_log is not None:
            self._relay_log.close()
            self._relay_log = None
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self._created.clear()
        if self._temporary and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NetLab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _add_netns(self, name: str) -> None:
        ip("netns", "add", name)
        self._created.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _make_namespaces(self) -> None:
        self._add_netns(self.hub)
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        for node in self.nodes.values():
            self._add_netns(node.netns)
            port = f"n{node.index}"
            ip(
                "link", "add", "lab0", "netns", node.netns, "type", "veth",
                "peer", "name", port, "netns", self.hub,
            )  # fmt: skip
            ip("-n", self.hub, "link", "set", port, "master", "br0")
            ip("-n", self.hub, "link", "set", port, "up")
            ip("-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", "lab0")
            ip("-n", node.netns, "link", "set", "lab0", "up")
            if self.bandwidth:
                self._limit(node.netns, "lab0")  # its upload
                self._limit(self.hub, port)  # its download

    def _limit(self, netns: str, dev: str) -> None:
        burst = max(32 * 1024, _rate_bits(self.bandwidth) // 8 // 100)  # ≥ 10 ms at full rate
        run_checked(
            ["tc", "-n", netns, "qdisc", "add", "dev", dev, "root", "tbf",
             "rate", str(self.bandwidth), "burst", str(burst), "latency", "100ms"]
        )  # fmt: skip

    def _start_relay(self) -> None:
        if self.workdir is None:
            self.workdir, self._temporary = Path(tempfile.mkdtemp(prefix="netlab-")), True
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "relay.json"
        config.write_text(json.dumps(self.relay_config()))
        self._relay_log = open(self.workdir / "relay.log", "wb")  # noqa: SIM115 - closed in down()
        self._relay = subprocess.Popen(
            [sys.executable, "-m", "tests.netlab_relay", str(config)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self._relay_log,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        line = self._relay.stdout.readline() if self._relay.stdout else ""
        if line.strip() != "ready":
            log = (self.workdir / "relay.log").read_text(errors="replace")[-2000:]
            raise LabUnavailable(f"the lab's relay did not start: {line!r}\n{log}")

    def relay_config(self) -> list[dict[str, Any]]:
        return [
            {
                "netns": node.netns,
                "ip": node.ip,
                "listen_port": node.relay_port,
                "upstream_ports": [node.slot_port(k) for k in range(PORT_SLOTS)],
                "delays": {
                    other.ip: self.latency(node.name, other.name) / 1000
                    for other in self.nodes.values()
                },
                "default_delay": self.latency_ms / 1000,
            }
            for node in self.nodes.values()
        ]

    # ----- daemons in the lab -------------------------------------------------------
    def daemon_args(self, name: str, slot: int = 0) -> list[str]:
        """Options that put a daemon on `name`'s node: listen inside, advertise the relay."""
        node = self.nodes[name]
        return ["--port", str(node.slot_port(slot)), "--announce-addr", node.public_addr]

    def addr(self, name: str, peer_id: str) -> str:
        """The multiaddr other nodes dial `name`'s daemon (of `peer_id`) with."""
        return f"{self.nodes[name].public_addr}/p2p/{peer_id}"

    def prefix(self, name: str) -> list[str]:
        """A command prefix that runs a program on `name`'s node."""
        return ["ip", "netns", "exec", self.nodes[name].netns]

    def spawn(
        self, group: Any, node: str, name: str, *args: str, command: str = "join", slot: int = 0
    ) -> Any:
        """`group.spawn` (a tests.launcher.HarnessGroup) of a daemon on `node`, unwaited."""
        return group.spawn(
            name,
            *args,
            *self.daemon_args(node, slot),
            command=command,
            host="127.0.0.1",
            netns=self.nodes[node].netns,
        )


def _rate_bits(rate: str | None) -> int:
    units = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3, "bit": 1}
    text = (rate or "").lower()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    raise ValueError(f"bandwidth must look like 50mbit, 500kbit or 1gbit, got {rate!r}")


def lab_unavailable_reason() -> str | None:
    """Why a lab cannot be made here (not root, no ip/tc, no namespaces), or None."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces)"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"the network lab needs iproute2's {tool}"
    return None


# ----- a one-shot peer that pings another from inside the lab -------------------------
async def ping_peer(args: argparse.Namespace) -> dict[str, Any]:
    import trio

    from peerd.config import NodeConfig
    from peerd.node import Node

    config = NodeConfig(
        home=Path(args.home),
        host="127.0.0.1",
        port=args.port,
        announce_addrs=[args.announce_addr],
        initial_peers=[args.initial_peers],
        announce_period=args.period,
    )
    node = Node(config)
    out: dict[str, Any] = {}
    with trio.fail_after(args.timeout):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            await node.ping(args.target)  # opens the connection (not timed)
            out["rtts"] = [await node.ping(args.target) for _ in range(args.count)]
            from libp2p.peer.id import ID

            conns = node.host.get_network().get_connections(ID.from_base58(args.target))
            out["remote_addrs"] = [str(a) for c in conns for a in c.get_transport_addresses()]
            await node.shutdown()
            nursery.cancel_scope.cancel()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.netlab")
    sub = parser.add_subparsers(dest="what", required=True)
    ping = sub.add_parser("ping", help="join, ping a peer, print the round trips as JSON")
    ping.add_argument("--home", required=True)
    ping.add_argument("--port", type=int, required=True)
    ping.add_argument("--announce-addr", required=True)
    ping.add_argument("--initial-peers", required=True)
    ping.add_argument("--target", required=True)
    ping.add_argument("--count", type=int, default=5)
    ping.add_argument("--period", type=float, default=2.0)
    ping.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    import trio

    from peerd.logging import setup_logging

    setup_logging("WARNING")
    began = time.monotonic()
    result = trio.run(ping_peer, args)
    result["seconds"] = time.monotonic() - began
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

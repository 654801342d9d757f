"""NodeConfig: every networking option of a peerd daemon in one typed, documented place.

A field whose metadata has `help` is also a command-line option of `peerd serve` and `peerd join`
(and a key of their `--config` file): its default, help text and spelling are stated here only;
`cli/options.py` turns them into click options. See that module for the metadata keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HOME = Path("~/.peerd")
IDENTITY_FILE = "identity.key"
REACHABILITY_MODES = ("auto", "public", "private")


@dataclass
class NodeConfig:
    """How a node joins the swarm; `peerd serve` and `peerd join` both build one of these."""

    # One home per daemon, so several can share a machine.
    home: Path = field(
        default=DEFAULT_HOME,
        metadata={
            "help": "Directory for this daemon's state (identity key, ...).",
            "path": "dir",
            "envvar": "PEERD_HOME",
        },
    )
    # Created with mode 0600 on first start.
    identity: Path | None = field(
        default=None,
        metadata={
            "help": "Identity key file (default: HOME/identity.key, created on first start).",
            "path": "file",
        },
    )
    host: str = field(default="0.0.0.0", metadata={"help": "IP address to listen on."})
    port: int = field(
        default=0,
        metadata={"help": "TCP port to listen on (0: any free port).", "min": 0, "max": 65535},
    )
    # Advertised besides the listen addresses (e.g. a port-forwarded IP).
    announce_addrs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Public address to advertise, e.g. /ip4/203.0.113.5/tcp/31337 (repeatable).",
            "flag": "--announce-addr",
            "metavar": "MULTIADDR",
        },
    )
    initial_peers: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Addresses of peers in the swarm, ending in /p2p/<peer id> "
            "(repeatable; several may be separated by spaces or commas).",
            "metavar": "MULTIADDR...",
            "envvar": "PEERD_INITIAL_PEERS",
        },
    )
    new_swarm: bool = field(
        default=False,
        metadata={"help": "Start a new private swarm and print the addresses others join it with."},
    )
    # Records expire after `record_ttl`.
    announce_period: float = field(
        default=30.0,
        metadata={
            "help": "Seconds between announcements; a dead peer's record expires after two.",
            "min": 0.1,
        },
    )
    # Re-send provider announcements every this many announce periods (they live 48 h on the
    # storing peers; re-sending only reaches peers that joined since).
    provide_every: int = 10
    # Act as a circuit relay v2 hop for unreachable peers when we are publicly reachable.
    relay: bool = field(
        default=True,
        metadata={
            "help": "Do not relay traffic for unreachable peers, even when reachable.",
            "flag": "--no-relay",
            "negate": True,
        },
    )
    # "auto" asks peers to dial us back; "public"/"private" skip the check.
    reachability: str = field(
        default="auto",
        metadata={
            "help": "Skip the dial-back test by saying how we are reachable.",
            "choices": REACHABILITY_MODES,
        },
    )
    # An unreachable node keeps reservations on this many relays (or as many as exist).
    min_relays: int = 2
    # Resource limits of our relay hop.
    relay_max_reservations: int = 16
    relay_max_circuits_per_peer: int = 8
    relay_circuit_seconds: int = 3600
    relay_circuit_bytes: int = 1 << 30
    # Try DCUtR hole punching to upgrade relayed connections to direct ones (best effort).
    dcutr: bool = True
    # Private DHT protocol prefix (py-libp2p 0.8.1 stores it but still speaks /ipfs/kad/1.0.0).
    dht_protocol_prefix: str = "/peerd"
    # Seconds for one outbound dial (direct or through a relay) before giving up.
    dial_timeout: float = 5.0

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser()
        if self.identity is not None:
            self.identity = Path(self.identity).expanduser()
        if self.reachability not in REACHABILITY_MODES:
            raise ValueError(
                f"reachability must be one of {REACHABILITY_MODES}, got {self.reachability!r}"
            )
        if self.announce_period <= 0:
            raise ValueError("announce_period must be positive")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.min_relays < 1:
            raise ValueError("min_relays must be at least 1")

    @property
    def identity_path(self) -> Path:
        return self.identity if self.identity is not None else self.home / IDENTITY_FILE

    @property
    def record_ttl(self) -> float:
        """A record lives two announce periods: a killed server vanishes within about that."""
        return 2.0 * self.announce_period

"""NodeConfig: every networking option of a peerd daemon in one typed, documented place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HOME = Path("~/.peerd")
IDENTITY_FILE = "identity.key"
REACHABILITY_MODES = ("auto", "public", "private")


@dataclass
class NodeConfig:
    """How a node joins the swarm; `peerd serve` and `peerd join` both build one of these."""

    # Where state files live (identity key, ...): one home per daemon, so several can share a
    # machine.
    home: Path = DEFAULT_HOME
    # Identity key file; None means <home>/identity.key (created, mode 0600, on first start).
    identity: Path | None = None
    # Interface and TCP port to listen on (port 0 = any free port).
    host: str = "0.0.0.0"
    port: int = 0
    # Public multiaddrs to advertise besides the listen addresses (e.g. a port-forwarded IP).
    announce_addrs: list[str] = field(default_factory=list)
    # Multiaddrs (with /p2p/<peer id>) of peers already in the swarm.
    initial_peers: list[str] = field(default_factory=list)
    # Start a new private swarm instead of joining one.
    new_swarm: bool = False
    # Seconds between re-announcements of our record; records expire after `record_ttl`.
    announce_period: float = 30.0
    # Re-send provider announcements every this many announce periods (they live 48 h on the
    # storing peers; re-sending only reaches peers that joined since).
    provide_every: int = 10
    # Act as a circuit relay v2 hop for unreachable peers when we are publicly reachable.
    relay: bool = True
    # "auto" asks peers to dial us back; "public"/"private" skip the check.
    reachability: str = "auto"
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

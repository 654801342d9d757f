"""Build the libp2p host: TCP, Noise only, yamux, no artificial dial delay.

Choices, measured on py-libp2p 0.8.1 (see shared/LIBP2P-NOTES.md and the report):
- Noise is the only security protocol offered: the default host also accepts plaintext and
  secio peers, which would let sessions run unencrypted.
- yamux only (mplex is 5-10x slower for bulk data in this version).
- TCP only: QUIC v1 here is slower for bulk data and flaky on quick reconnects.
- py-libp2p's resource manager limits connections (per peer, pending, total) and is given
  explicitly, with our figures; it does not count inbound streams (0.8.1 checks only
  outbound ones), so per-peer stream limits live in our handlers (peerd/server/streams.py).
- `max_connections_per_peer=1` ends the happy-eyeballs wait as soon as one dial succeeds;
  with the default (3) every successful dial waits a fixed 250 ms.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

import multiaddr
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.rcmgr import new_resource_manager
from libp2p.rcmgr.connection_limits import ConnectionLimits
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.utils.address_validation import expand_wildcard_address

WILDCARDS = ("0.0.0.0", "::")

CONNECTION_LIMITS = ConnectionLimits(
    max_pending_inbound=64,  # handshakes under way: a flood of half-open dials waits
    max_pending_outbound=64,
    max_established_inbound=512,
    max_established_outbound=256,
    max_established_per_peer=16,  # one in use; redials and relayed ones whose close is not yet seen
    max_established_total=768,
)


class ListenError(OSError):
    """The host cannot listen on the address asked for."""


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on.

    py-libp2p's TCP listener sets SO_REUSEPORT, so a second daemon on the same --port would
    bind too and silently receive half of the first one's connections; a plain bind fails.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # connections of a previous run in TIME_WAIT must not block a restart on its port;
        # a socket that listens there still does (SO_REUSEADDR never overrides a listener)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port"
            ) from None


def listen_multiaddr(host: str, port: int) -> multiaddr.Multiaddr:
    """`/ip4/<host>/tcp/<port>` (or ip6) for a --host/--port pair."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        raise ValueError(f"--host must be an IP address, got {host!r}") from None
    return multiaddr.Multiaddr(f"/ip{version}/{host}/tcp/{port}")


def security_options(key_pair: KeyPair) -> dict[TProtocol, NoiseTransport]:
    """Noise and nothing else: a peer that offers only plaintext or secio is refused."""
    noise_key = create_x25519_key_pair().private_key
    return {TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(key_pair, noise_privkey=noise_key)}


def make_host(
    key_pair: KeyPair,
    *,
    listen: multiaddr.Multiaddr,
    announce: Sequence[str] = (),
    dial_timeout: float = 5.0,
) -> IHost:
    """A host that advertises its concrete listen addresses plus `announce` (no observed ones)."""
    announce_addrs = [multiaddr.Multiaddr(a) for a in announce]
    built: list[IHost] = []  # the factory runs once inside new_host, before it returns

    def advertised(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        # Identify's observed addresses carry the ephemeral source port of our outbound
        # connections, which nobody can dial: advertise the real listen addresses only.
        out = list(announce_addrs)
        for addr in built[0].get_transport_addrs() if built else []:
            out.extend(expand_listen_addr(addr))
        return _dedupe(out)

    host_obj = new_host(
        key_pair=key_pair,
        sec_opt=security_options(key_pair),
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=[listen],
        connection_config=ConnectionConfig(max_connections_per_peer=1, dial_timeout=dial_timeout),
        addrs_factory=advertised,
        enable_quic=False,
        resource_manager=new_resource_manager(connection_limits=CONNECTION_LIMITS),
    )
    built.append(host_obj)
    return host_obj


def expand_listen_addr(addr: multiaddr.Multiaddr) -> list[multiaddr.Multiaddr]:
    """A wildcard listen address becomes one address per local interface."""
    ip = _ip_of(addr)
    if ip not in WILDCARDS:
        return [addr]
    out = [a for a in expand_wildcard_address(addr) if _ip_of(a) not in WILDCARDS]
    loopback = "127.0.0.1" if ip == "0.0.0.0" else "::1"
    out.append(multiaddr.Multiaddr(str(addr).replace(f"/{ip}/", f"/{loopback}/", 1)))
    return _dedupe(out)


def is_relayed(addr: multiaddr.Multiaddr | str) -> bool:
    return "/p2p-circuit" in str(addr)


def is_loopback(addr: multiaddr.Multiaddr | str) -> bool:
    ip = _ip_of(multiaddr.Multiaddr(str(addr)))
    try:
        return ip is not None and ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def with_peer_id(addr: multiaddr.Multiaddr | str, peer_id: str) -> str:
    """`addr` ending in `/p2p/<peer_id>` exactly once."""
    text = str(addr)
    suffix = f"/p2p/{peer_id}"
    return text if text.endswith(suffix) else text + suffix


def _ip_of(addr: multiaddr.Multiaddr) -> str | None:
    for proto in ("ip4", "ip6"):
        try:
            return str(addr.value_for_protocol(proto))
        except Exception:
            continue
    return None


def _dedupe(addrs: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    seen: set[str] = set()
    out = []
    for a in addrs:
        if str(a) not in seen:
            seen.add(str(a))
            out.append(a)
    return out

"""Am I reachable from outside? Ask connected peers to dial back (`/peerd/dialback/1.0.0`).

py-libp2p 0.8.1 ships AutoNAT, but its server answers with `host.connect()`, which reuses the
connection the request came on, so every node is told it is public. Our dial-back opens a
separate TCP connection to each address the asker lists, runs the Noise handshake to check the
peer id behind it, and closes it without registering it in the swarm.

A peer dials only addresses on the IP it sees the request coming from (no amplification), at
most MAX_ADDRS of them, and never for a request that came through a relay.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

import msgpack
import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from peerd.host import is_relayed

log = logging.getLogger("peerd.reachability")

DIALBACK_PROTOCOL = TProtocol("/peerd/dialback/1.0.0")
MAX_ADDRS = 4
MAX_MESSAGE = 16 * 1024
DIAL_TIMEOUT = 5.0
ASK_TIMEOUT = 12.0
MAX_HELPERS = 3


class DialbackService:
    """Answers other peers' dial-back requests (every node runs it; it costs one dial)."""

    def __init__(self, host: IHost) -> None:
        self.host = host
        self._limiter = trio.CapacityLimiter(4)

    def install(self) -> None:
        self.host.set_stream_handler(DIALBACK_PROTOCOL, self.handle)

    async def handle(self, stream: INetStream) -> None:
        try:
            with trio.fail_after(ASK_TIMEOUT):
                request = await read_message(stream)
                reply = await self._answer(stream, request)
                await write_message(stream, reply)
        except Exception as exc:
            log.debug("dial-back request failed: %r", exc)
        finally:
            await _close(stream)

    async def _answer(self, stream: INetStream, request: object) -> dict:
        peer_id = stream.muxed_conn.peer_id
        if self._only_relayed(peer_id):
            return {"ok": [], "error": "request came through a relay"}
        observed = stream.get_remote_address()
        if (
            not observed
            or not isinstance(request, dict)
            or not isinstance(request.get("addrs"), list)
        ):
            return {"ok": [], "error": "bad request"}
        ok = []
        async with self._limiter:
            for text in request["addrs"][:MAX_ADDRS]:
                if not isinstance(text, str) or len(text) > 512:
                    continue
                try:
                    addr = multiaddr.Multiaddr(text)
                except Exception:
                    continue
                if _ip_of(addr) != observed[0] or is_relayed(addr):
                    continue
                if await verified_dial(self.host, addr, peer_id):
                    ok.append(text)
        return {"ok": ok, "error": ""}

    def _only_relayed(self, peer_id: ID) -> bool:
        conns = self.host.get_network().get_connections(peer_id)
        addrs = [str(a) for c in conns for a in _transport_addrs(c)]
        return bool(addrs) and all(is_relayed(a) for a in addrs)


async def verified_dial(host: IHost, addr: multiaddr.Multiaddr, peer_id: ID) -> bool:
    """Open a fresh TCP connection to `addr` and check the Noise handshake proves `peer_id`."""
    swarm = host.get_network()
    transport = swarm.transport_manager.transport_for_dialing(addr)  # type: ignore[attr-defined]
    if transport is None:
        return False
    target = multiaddr.Multiaddr(str(addr).split("/p2p/")[0] + f"/p2p/{peer_id}")
    raw = None
    with trio.move_on_after(DIAL_TIMEOUT):
        try:
            raw = await transport.dial(target)
            secure = await swarm.upgrader.upgrade_security(raw, True, peer_id)  # type: ignore[attr-defined]
            await secure.close()
            return True
        except Exception as exc:
            log.debug("dial-back to %s failed: %r", addr, exc)
        finally:
            if raw is not None:
                with trio.CancelScope(shield=True):
                    await _close(raw)
    return False


async def ask_dialback(host: IHost, helpers: Sequence[ID], addrs: Sequence[str]) -> bool | None:
    """True if a helper reached us on one of `addrs`, False if all who answered failed,
    None if nobody answered (then we cannot tell)."""
    verdicts: list[bool] = []

    async def ask(peer_id: ID) -> None:
        stream = None
        with trio.move_on_after(ASK_TIMEOUT):
            try:
                stream = await host.new_stream(peer_id, [DIALBACK_PROTOCOL])
                await write_message(stream, {"addrs": list(addrs)[:MAX_ADDRS]})
                reply = await read_message(stream)
                if isinstance(reply, dict) and isinstance(reply.get("ok"), list):
                    verdicts.append(bool(reply["ok"]))
                    log.debug("dial-back from %s: %s", str(peer_id)[:12], reply)
            except Exception as exc:
                log.debug("dial-back request to %s failed: %r", peer_id, exc)
            finally:
                if stream is not None:
                    await _close(stream)

    async with trio.open_nursery() as nursery:
        for peer_id in list(helpers)[:MAX_HELPERS]:
            nursery.start_soon(ask, peer_id)
    if not verdicts:
        return None
    return any(verdicts)


async def write_message(stream: INetStream, message: dict) -> None:
    payload = msgpack.packb(message, use_bin_type=True)
    await stream.write(struct.pack(">I", len(payload)) + payload)


async def read_message(stream: INetStream) -> object:
    (size,) = struct.unpack(">I", await read_exactly(stream, 4))
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes is over the {MAX_MESSAGE} cap")
    return msgpack.unpackb(await read_exactly(stream, size), raw=False)


async def read_exactly(stream: INetStream, n: int) -> bytes:
    """libp2p streams return what is buffered; loop until `n` bytes arrived."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise EOFError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _transport_addrs(conn: object) -> list:
    try:
        return list(conn.get_transport_addresses())  # type: ignore[attr-defined]
    except Exception:
        return []


def _ip_of(addr: multiaddr.Multiaddr) -> str | None:
    for proto in ("ip4", "ip6"):
        try:
            return str(addr.value_for_protocol(proto))
        except Exception:
            continue
    return None


async def _close(closable: object) -> None:
    try:
        with trio.move_on_after(1.0):
            await closable.close()  # type: ignore[attr-defined]
    except Exception:
        pass

"""The local Unix-socket API: scripts on this machine run models through the daemon.

One task per connection, owned by the listener's nursery; every request is answered (an
`Error` for anything wrong) and a misbehaving connection only ever closes itself. Requests go
through a dispatch table (message type → handler); chains opened on a connection belong to it
and are closed when it goes away. The socket file is created with mode 0600 inside the
daemon's home.
"""

from __future__ import annotations

import logging
import os
import socket as stdsocket
from pathlib import Path
from typing import TYPE_CHECKING

import trio

import wire
from peerd.framed import ConnectionLost, FramedChannel, TrioByteStream
from peerd.local_api.chains import ChainFactory, ChainHandlers
from peerd.local_api.connection import ApiConnection, Handler
from peerd.local_api.generate import GenerateHandler
from peerd.local_api.training import TrainingHandlers
from peerd.models import ModelRegistry
from wire import ErrorCode, WireError
from wire import local as api

if TYPE_CHECKING:
    from peerd.swarm import SwarmAccess

log = logging.getLogger("peerd.api")

CLOSE_CHAIN_TIMEOUT = 2.0


class LocalAPI:
    """Serves the socket; the handlers do the work."""

    def __init__(
        self, swarm: SwarmAccess, socket_path: Path, *, max_frame: int = wire.DEFAULT_MAX_FRAME
    ):
        self.socket_path = Path(socket_path)
        self.max_frame = max_frame
        self.models = ModelRegistry(swarm)
        self.chains = ChainFactory(swarm)
        chains = ChainHandlers(self.models, self.chains, max_frame)
        training = TrainingHandlers(self.models, self.chains)
        self.handlers: dict[type[wire.Message], Handler] = {
            api.ListModels: self._list_models,
            api.OpenChain: chains.open,
            api.ChainStep: chains.step,
            api.CloseChain: chains.close,
            api.Generate: GenerateHandler(self.models, self.chains),
            api.ChainForward: training.forward,
            api.ChainBackward: training.backward,
            wire.Ping: self._ping,
        }
        self.listening = trio.Event()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listener = await self._listen()
        log.info("local API listening on %s", self.socket_path)
        self.listening.set()
        task_status.started()
        try:
            await trio.serve_listeners(self._handle_connection, [listener])
        finally:
            with trio.CancelScope(shield=True):
                try:
                    self.socket_path.unlink()
                except OSError:
                    pass

    async def _listen(self) -> trio.SocketListener:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists() or path.is_symlink():
            path.unlink()
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the file is born 0600: no window for other users
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(64)
        return trio.SocketListener(sock)

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        conn = ApiConnection(FramedChannel(TrioByteStream(stream), self.max_frame))
        try:
            while True:
                try:
                    raw = await conn.channel.read_message()
                except WireError as exc:  # the framing itself is broken: answer and hang up
                    await conn.reply(wire.Error.from_exception(exc))
                    return
                await self._answer(raw, conn)
        except ConnectionLost:
            pass
        finally:
            with trio.CancelScope(shield=True):
                for chain in conn.chains.values():
                    with trio.move_on_after(CLOSE_CHAIN_TIMEOUT):
                        await chain.aclose()
                await conn.channel.aclose()

    async def _answer(self, raw: dict, conn: ApiConnection) -> None:
        rid = raw.get("request_id") if isinstance(raw, dict) else None
        conn.request_id = rid if type(rid) is int and rid >= 0 else None  # even if refused
        try:
            request = wire.parse_message(raw)  # no decoded cap: the socket is our user's own
            handler = self.handlers.get(type(request))
            if handler is None:
                raise WireError(
                    ErrorCode.BAD_REQUEST, f"{request.TYPE!r} is not a local API request"
                )
            await handler(request, conn)
        except WireError as exc:  # ChainError included: the chain's answer to this request
            await conn.reply(wire.Error.from_exception(exc))
        except ConnectionLost:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad request never kills the daemon
            log.exception("local API request failed")
            await conn.reply(wire.Error.from_exception(exc))
        finally:
            conn.request_id = None  # a framing error after it answers no request

    async def _list_models(self, request: api.ListModels, conn: ApiConnection) -> None:
        await conn.reply(api.ModelList(models=await self.models.swarm_models()))

    async def _ping(self, request: wire.Ping, conn: ApiConnection) -> None:
        await conn.reply(wire.Pong(nonce=request.nonce))

"""Request ids on the local socket: a client that timed out never reads the late reply as
the answer to its next request, and a retried ChainStep is applied once."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
import trio

import wire
from peerd.client.connection import Connection, PeerdError
from peerd.local_api.chains import ChainHandlers
from peerd.local_api.connection import ApiConnection
from wire import local as api


def _read_frame(sock: socket.socket) -> dict:
    def exactly(n):
        data = b""
        while len(data) < n:
            data += sock.recv(n - len(data))
        return data

    size = wire.parse_header(exactly(wire.HEADER_SIZE), wire.DEFAULT_MAX_FRAME)
    return wire.decode_payload(exactly(size))


def test_a_late_reply_is_never_taken_for_the_next_ones(tmp_path):
    path = str(tmp_path / "sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def daemon():
        conn, _ = listener.accept()
        with conn:
            for name in ("late", "prompt"):
                raw = _read_frame(conn)
                if name == "late":
                    time.sleep(0.5)  # the client gives up on this one
                reply = api.ModelList(models={name: {}}, request_id=raw.get("request_id"))
                conn.sendall(wire.encode_frame(reply.to_wire()))

    thread = threading.Thread(target=daemon, daemon=True)
    thread.start()
    client = Connection(path, timeout=0.2)
    with pytest.raises(PeerdError) as timed_out:
        client.request(api.ListModels(), api.ModelList)
    assert timed_out.value.code == "timeout"
    client.sock.settimeout(5.0)
    time.sleep(0.4)  # the late reply has arrived by now
    reply = client.request(api.ListModels(), api.ModelList)
    assert list(reply.models) == ["prompt"]
    client.close()
    thread.join(5)


class CountingChain:
    def __init__(self) -> None:
        self.steps = 0
        self.route = [("p", 0, 2)]
        self.recoveries: list = []

    async def step(self, hidden, reorder=None):
        self.steps += 1
        return hidden + self.steps


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def write_message(self, raw: dict) -> None:
        self.sent.append(raw)


def test_a_retried_step_is_applied_once():
    chain = CountingChain()
    conn = ApiConnection(FakeChannel())  # type: ignore[arg-type]
    conn.chains["c"] = chain  # type: ignore[assignment]
    handlers = ChainHandlers(models=None, chains=None, max_frame=wire.DEFAULT_MAX_FRAME)  # type: ignore[arg-type]
    step = api.ChainStep(chain_id="c", hidden=torch.zeros(1, 1, 4), request_id=7)

    async def main():
        for _ in range(2):
            conn.request_id = step.request_id
            await handlers.step(step, conn)

    trio.run(main)
    assert chain.steps == 1
    first, second = (wire.parse_message(raw) for raw in conn.channel.sent)
    assert first.request_id == second.request_id == 7
    assert torch.equal(first.hidden, second.hidden)

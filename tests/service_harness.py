"""A BlockService over a fake swarm: its life cycle (load, drain, move) without a network."""

from __future__ import annotations

from pathlib import Path

import trio

from peerd.records import ServerRecord
from peerd.server import service
from peerd.server.service import BlockService, ServeOptions

THROUGHPUT = {"block_inference_steps_per_s": 10.0, "block_forward_tokens_per_s": 100.0}


class FakeNode:
    peer_id = "12D3KooWself"

    def __init__(self) -> None:
        self.announced: list[ServerRecord] = []
        self.provider = None
        self.handlers: dict[str, object] = {}

    def set_record_provider(self, provider) -> None:
        self.provider = provider

    def set_stream_handler(self, protocol: str, handler) -> None:
        self.handlers[protocol] = handler

    def request_announce(self) -> None:
        if self.provider is not None and self.provider() is not None:
            self.announced.append(self.provider())

    async def announce(self, **_: object) -> ServerRecord | None:
        self.request_announce()
        return self.announced[-1] if self.announced else None


class FakeSwarm:
    def __init__(self, cache_dir: Path) -> None:
        self.node = FakeNode()
        self.cache_dir = cache_dir
        self.local_handlers: dict[str, object] = {}
        self.records: list[ServerRecord] = []

    async def list_servers(self, model_id: str | None) -> list[ServerRecord]:
        return list(self.records)

    def model_name_for(self, path: Path) -> str:
        return Path(path).name

    async def probe_rtts(self, peer_ids) -> dict[str, float]:
        return {}


def make_service(monkeypatch, options: ServeOptions, tmp_path: Path) -> BlockService:
    """A service whose throughput is not measured (a fixed figure) and whose swarm is fake."""
    monkeypatch.setattr(service, "measure_throughput", lambda *a, **k: dict(THROUGHPUT))
    svc = BlockService(options, FakeSwarm(tmp_path / "cache"))
    svc.model_id = "tiny@cafe"
    svc.swarm.node.set_record_provider(svc.record)
    return svc


async def serve(svc: BlockService, interval: tuple[int, int]) -> None:
    await svc._load_and_serve(interval)


__all__ = ["FakeSwarm", "make_service", "serve", "trio"]


async def _fake_shutdown(node: FakeNode) -> None:
    node.shut_down = True
    node.request_announce()


FakeNode.shut_down = False
FakeNode.shutdown = _fake_shutdown

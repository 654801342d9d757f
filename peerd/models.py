"""Which model a request means, and the client-side parts this daemon holds of it.

A request names a model by its id ("name@fingerprint", as `ListModels` shows it), by the name
alone when exactly one model in the swarm has it, or by a checkpoint directory on this machine.
A directory's client-side parts (embeddings, final norm, LM head, tokenizer) are loaded once
and kept; concurrent requests for the same directory wait for that one load instead of each
loading (and fingerprinting) it again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from blocks import checkpoint_fingerprint
from peerd.client_model import ClientModel
from peerd.swarm_view import coverage, gaps
from wire import ErrorCode, WireError

if TYPE_CHECKING:
    from peerd.swarm import SwarmAccess

log = logging.getLogger("peerd.models")


@dataclass(frozen=True)
class ResolvedModel:
    model_id: str
    num_blocks: int
    local: ClientModel | None  # None: this daemon has no checkpoint directory of it


class ModelRegistry:
    """Resolves model references; owns the client-side parts loaded from checkpoint dirs."""

    def __init__(self, swarm: SwarmAccess) -> None:
        self.swarm = swarm
        self._loaded: dict[Path, ResolvedModel] = {}
        self._loading: dict[Path, trio.Lock] = {}
        self._paths_by_id: dict[str, Path] = {}

    async def swarm_models(self) -> dict[str, dict]:
        """{model_id: {num_blocks, coverage, gaps, servers}} of every model in the swarm."""
        records = await self.swarm.list_servers(None)
        models: dict[str, dict] = {}
        for record in records:
            models.setdefault(record.model_id, {"servers": []})["servers"].append(record.to_dict())
        for model_id, info in models.items():
            mine = [r for r in records if r.model_id == model_id]
            num_blocks = max(max(r.num_blocks, r.end) for r in mine)
            counts = coverage(mine, num_blocks)
            info.update(
                num_blocks=num_blocks, coverage=counts, gaps=[list(g) for g in gaps(counts)]
            )
        return models

    async def resolve(self, reference: str) -> ResolvedModel:
        path = Path(reference).expanduser()
        if (path / "config.json").exists():
            return await self._load_dir(path.resolve())
        return await self._resolve_id(reference)

    async def _load_dir(self, path: Path) -> ResolvedModel:
        lock = self._loading.setdefault(path, trio.Lock())
        async with lock:
            known = self._loaded.get(path)
            if known is not None:
                return known
            local = await trio.to_thread.run_sync(ClientModel.load, path)
            fingerprint = await trio.to_thread.run_sync(
                lambda: checkpoint_fingerprint(path, self.swarm.cache_dir)
            )
            model_id = f"{self.swarm.model_name_for(path)}@{fingerprint}"
            resolved = ResolvedModel(model_id, local.parts.config.num_blocks, local)
            self._loaded[path] = resolved
            self._paths_by_id[model_id] = path
            log.info("loaded the client-side parts of %s from %s", model_id, path)
            return resolved

    async def _resolve_id(self, reference: str) -> ResolvedModel:
        path = self._paths_by_id.get(reference)
        if path is not None:
            return self._loaded[path]
        models = await self.swarm_models()
        model_id = reference
        if model_id not in models:
            matches = [m for m in models if m.split("@", 1)[0] == reference]
            if len(matches) != 1:
                known = ", ".join(sorted(models)) or "none"
                what = "several models match" if matches else "no server in the swarm serves"
                raise WireError(
                    ErrorCode.UNKNOWN_MODEL, f"{what} {reference!r} (models in the swarm: {known})"
                )
            model_id = matches[0]
        path = self._paths_by_id.get(model_id)
        if path is not None:
            return self._loaded[path]
        return ResolvedModel(model_id, models[model_id]["num_blocks"], None)

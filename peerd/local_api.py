"""The local Unix-socket API: scripts on this machine run models through the daemon.

One task per connection, owned by the listener's nursery; every request is answered (an
`Error` for anything wrong) and a misbehaving connection only ever closes itself. Chains
opened on a connection belong to it and are closed when it goes away. The socket file is
created with mode 0600 inside the daemon's home.
"""

from __future__ import annotations

import logging
import os
import socket as stdsocket
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import trio

import wire
from blocks import checkpoint_fingerprint, load_config
from peerd.chain import ChainError, ChainOptions, InferenceChain, Planning
from peerd.framed import ConnectionLost, FramedChannel, TrioByteStream
from peerd.generation import LocalModel, generate_ids
from peerd.sampling import SamplingParams
from peerd.swarm_view import coverage, gaps
from peerd.training import TraceEntry, TrainingChain
from routing import BanList
from wire import local as api

if TYPE_CHECKING:
    from peerd.swarm import SwarmAccess

log = logging.getLogger("peerd.api")

MAX_TRACES = 64


class ApiError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class LocalAPI:
    """Serves the socket; resolves model references; owns chains per connection."""

    def __init__(
        self, swarm: SwarmAccess, socket_path: Path, *, max_frame: int = wire.DEFAULT_MAX_FRAME
    ):
        self.swarm = swarm
        self.socket_path = Path(socket_path)
        self.max_frame = max_frame
        self.bans = BanList()  # shared: a server that failed one script is avoided by all
        self._local_models: dict[str, LocalModel] = {}
        self._paths_by_id: dict[str, Path] = {}
        self._traces: OrderedDict[str, list[TraceEntry]] = OrderedDict()
        self._training_plans: dict[str, Planning] = {}
        self.listening = trio.Event()

    # ----- the socket --------------------------------------------------------------------
    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
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
        listener = trio.SocketListener(sock)
        log.info("local API listening on %s", path)
        self.listening.set()
        task_status.started()
        try:
            await trio.serve_listeners(self._handle_connection, [listener])
        finally:
            with trio.CancelScope(shield=True):
                try:
                    path.unlink()
                except OSError:
                    pass

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        channel = FramedChannel(TrioByteStream(stream), self.max_frame)
        chains: dict[str, InferenceChain] = {}
        try:
            while True:
                try:
                    raw = await channel.read_message()
                except wire.WireError as exc:  # the framing itself is broken: answer and hang up
                    await channel.write_message(
                        wire.Error(exc.code, exc.message, exc.details).to_wire()
                    )
                    return
                try:
                    request = wire.parse_message(raw)
                    await self._dispatch(request, channel, chains)
                except wire.WireError as exc:
                    await channel.write_message(
                        wire.Error(exc.code, exc.message, exc.details).to_wire()
                    )
                except (ApiError, ChainError) as exc:
                    await channel.write_message(wire.Error(exc.code, str(exc), {}).to_wire())
                except ConnectionLost:
                    raise
                except Exception as exc:  # noqa: BLE001 - one bad request never kills the daemon
                    log.exception("local API request failed")
                    await channel.write_message(wire.Error.from_exception(exc).to_wire())
        except ConnectionLost:
            pass
        finally:
            with trio.CancelScope(shield=True):
                for chain in chains.values():
                    with trio.move_on_after(2):
                        await chain.aclose()
                await channel.aclose()

    async def _dispatch(self, request: wire.Message, channel: FramedChannel, chains: dict) -> None:
        if isinstance(request, api.ListModels):
            await channel.write_message(api.ModelList(models=await self.list_models()).to_wire())
        elif isinstance(request, api.OpenChain):
            chain = await self._open_chain(request)
            chain_id = uuid.uuid4().hex
            chains[chain_id] = chain
            reply = api.ChainOpened(
                chain_id=chain_id,
                model_id=chain.options.model_id,
                num_blocks=chain.options.end,
                route=chain.route,
                max_frame=self.max_frame,
            )
            await channel.write_message(reply.to_wire())
        elif isinstance(request, api.ChainStep):
            chain = self._chain(chains, request.chain_id)
            hidden = await chain.step(request.hidden.float(), reorder=request.reorder)
            reply = api.ChainStepResult(
                hidden=hidden.to(request.hidden.dtype),
                route=chain.route,
                recoveries=len(chain.recoveries),
                compression=request.compression,
            )
            await channel.write_message(reply.to_wire())
        elif isinstance(request, api.CloseChain):
            chain = chains.pop(request.chain_id, None)
            if chain is None:
                raise ApiError(
                    "unknown_session", f"no open chain {request.chain_id!r} on this connection"
                )
            await chain.aclose()
            await channel.write_message(api.ChainClosed(chain_id=request.chain_id).to_wire())
        elif isinstance(request, api.Generate):
            await self._generate(request, channel)
        elif isinstance(request, api.ChainForward):
            await channel.write_message((await self._forward(request)).to_wire())
        elif isinstance(request, api.ChainBackward):
            await channel.write_message((await self._backward(request)).to_wire())
        elif isinstance(request, wire.Ping):
            await channel.write_message(wire.Pong(nonce=request.nonce).to_wire())
        else:
            raise ApiError("bad_request", f"{request.TYPE!r} is not a local API request")

    @staticmethod
    def _chain(chains: dict, chain_id: str) -> InferenceChain:
        chain = chains.get(chain_id)
        if chain is None:
            raise ApiError("unknown_session", f"no open chain {chain_id!r} on this connection")
        return chain

    # ----- models ------------------------------------------------------------------------
    async def list_models(self) -> dict:
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

    async def resolve(self, model: str) -> tuple[str, int, LocalModel | None]:
        """(model_id, num_blocks, local parts or None) for a model id, name or checkpoint dir."""
        path = Path(model).expanduser()
        if (path / "config.json").exists():
            key = str(path.resolve())
            local = self._local_models.get(key)
            if local is None:
                local = await trio.to_thread.run_sync(LocalModel.load, path)
                self._local_models[key] = local
            fingerprint = await trio.to_thread.run_sync(
                lambda: checkpoint_fingerprint(path, self.swarm.cache_dir)
            )
            model_id = f"{self.swarm.model_name_for(path)}@{fingerprint}"
            self._paths_by_id[model_id] = path
            return model_id, local.parts.config.num_blocks, local
        models = await self.list_models()
        if model not in models:
            matches = [m for m in models if m.split("@", 1)[0] == model]
            if len(matches) != 1:
                known = ", ".join(sorted(models)) or "none"
                what = "several models match" if matches else "no server in the swarm serves"
                raise ApiError("unknown_model", f"{what} {model!r} (models in the swarm: {known})")
            model = matches[0]
        num_blocks = models[model]["num_blocks"]
        path = self._paths_by_id.get(model)
        if path is not None:
            num_blocks = load_config(path).num_blocks
        return model, num_blocks, self._local_models.get(str(path.resolve())) if path else None

    # ----- chains ------------------------------------------------------------------------
    def _options(
        self,
        model_id: str,
        num_blocks: int,
        max_length: int,
        *,
        batch_size: int = 1,
        compression: str = "none",
        allow=None,
        deny=None,
        mode: str = "latency",
        pad_lengths=None,
    ) -> ChainOptions:
        return ChainOptions(
            model_id=model_id,
            start=0,
            end=num_blocks,
            max_length=max_length,
            batch_size=batch_size,
            compression=compression,
            allow=frozenset(allow) if allow is not None else None,
            deny=frozenset(deny or ()),
            mode=mode,
            pad_lengths=pad_lengths,
        )

    def _planning(self, options: ChainOptions) -> Planning:
        model_id = options.model_id
        return Planning(
            options=options,
            source=lambda: self.swarm.server_spans(model_id),
            probe_rtts=self.swarm.probe_rtts,
            bans=self.bans,
            clock=trio.current_time,
        )

    async def _open_chain(self, request: api.OpenChain) -> InferenceChain:
        model_id, num_blocks, _ = await self.resolve(request.model)
        options = self._options(
            model_id,
            num_blocks,
            request.max_length,
            batch_size=request.batch_size,
            compression=request.compression,
            allow=request.allow,
            deny=request.deny,
            pad_lengths=request.pad_lengths,
        )
        chain = InferenceChain(options, self._planning(options), self.swarm.connect)
        try:
            await chain.open()
        except BaseException:
            with trio.CancelScope(shield=True):
                await chain.aclose()
            raise
        log.info("chain for %s opened: %s", model_id, _route_text(chain.route))
        return chain

    async def _generate(self, request: api.Generate, channel: FramedChannel) -> None:
        model_id, num_blocks, local = await self.resolve(request.model)
        if local is None:
            raise ApiError(
                "unknown_model",
                f"to generate, this daemon needs the checkpoint directory of {model_id} "
                "(pass its path as the model)",
            )
        params = SamplingParams(
            max_new_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            repetition_penalty=request.repetition_penalty,
            stop=tuple(request.stop),
            seed=request.seed,
        )
        try:
            ids = (
                request.input_ids
                if request.input_ids is not None
                else local.encode(request.prompt or "")
            )
        except ValueError as exc:
            raise ApiError("bad_request", str(exc)) from None
        if not ids:
            raise ApiError("bad_request", "the prompt encodes to no tokens")
        vocab = local.parts.config.vocab_size
        if max(ids) >= vocab:
            raise ApiError(
                "bad_request", f"token id {max(ids)} is outside the vocabulary ({vocab})"
            )
        options = self._options(
            model_id,
            num_blocks,
            len(ids) + params.max_new_tokens,
            compression=request.compression,
            allow=request.allow,
            deny=request.deny,
        )
        chain = InferenceChain(options, self._planning(options), self.swarm.connect)
        new_ids: list[int] = []
        text = ""
        stop_reason = "length"
        route: list[tuple[str, int, int]] = []
        try:
            await chain.open()
            async for token in generate_ids(chain, local, torch.tensor([ids]), params):
                new_ids.append(int(token[0]))
                full = local.decode(new_ids)
                piece = ""
                if not full.endswith("\ufffd"):  # hold back a character still being spelled
                    piece, text = full[len(text) :], full
                await channel.write_message(
                    api.GeneratedToken(token_id=new_ids[-1], text=piece).to_wire()
                )
                if new_ids[-1] in local.eos_token_ids:
                    stop_reason = "eos"
                    break
                if any(s and s in text for s in params.stop):
                    stop_reason = "stop"
                    break
            route = chain.route
        finally:
            with trio.CancelScope(shield=True):
                await chain.aclose()
        text = local.decode(new_ids)
        recoveries = [
            {
                "failed_peer": r.failed_peer,
                "reason": r.reason,
                "from_block": r.from_block,
                "replayed_tokens": r.replayed_tokens,
                "seconds": r.seconds,
            }
            for r in chain.recoveries
        ]
        done = api.GenerationDone(
            token_ids=new_ids,
            text=text,
            stop_reason=stop_reason,
            route=route,
            recoveries=recoveries,
        )
        await channel.write_message(done.to_wire())

    # ----- training ----------------------------------------------------------------------
    async def _training_chain(self, model: str, compression: str) -> TrainingChain:
        """Training requests of a model share one planning state (pings are measured once)."""
        model_id, num_blocks, _ = await self.resolve(model)
        options = self._options(model_id, num_blocks, 1, compression=compression, mode="throughput")
        planning = self._training_plans.get(model_id)
        if planning is None:
            planning = self._planning(options)
            await planning.build()
            self._training_plans[model_id] = planning
        else:
            await planning.refresh()
        return TrainingChain(options, planning, self.swarm.connect)

    async def _forward(self, request: api.ChainForward) -> api.ChainForwardResult:
        chain = await self._training_chain(request.model, request.compression)
        output, trace = await chain.forward(request.hidden.float(), _maybe_float(request.prompts))
        trace_id = None
        if request.keep_trace:
            trace_id = uuid.uuid4().hex
            self._traces[trace_id] = trace
            while len(self._traces) > MAX_TRACES:
                self._traces.popitem(last=False)
        return api.ChainForwardResult(
            hidden=output.to(request.hidden.dtype),
            trace_id=trace_id,
            compression=request.compression,
        )

    async def _backward(self, request: api.ChainBackward) -> api.ChainBackwardResult:
        chain = await self._training_chain(request.model, request.compression)
        prompts = _maybe_float(request.prompts)
        trace = self._traces.pop(request.trace_id, None) if request.trace_id else None
        if trace is None or not trace or not torch.equal(trace[0].inputs, request.hidden.float()):
            _, trace = await chain.forward(request.hidden.float(), prompts)
        grad_hidden, grad_prompts = await chain.backward(trace, request.grad_out.float(), prompts)
        return api.ChainBackwardResult(
            grad_hidden=grad_hidden.to(request.hidden.dtype),
            grad_prompts=None if grad_prompts is None else grad_prompts.to(request.prompts.dtype),
            compression=request.compression,
        )


def _maybe_float(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.float()


def _route_text(route: list[tuple[str, int, int]]) -> str:
    return " → ".join(f"{peer[-6:]}[{start}:{end})" for peer, start, end in route)

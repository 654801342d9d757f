"""Fuzzing real daemons: hostile frames at a `peerd serve` process and a daemon's local socket.

Two daemons: a server of a tiny Llama (`serve --new-swarm`, all blocks) and a `join` daemon
whose local socket is fuzzed (its chains reach the server over libp2p). Several in-process
nodes with their own keys throw frames from `tests.fuzz_frames` at the server's inference and
RPC protocols, raw TCP garbage goes to its listen port, and local workers fuzz the join
daemon's socket, while two well-behaved sessions run alongside: an inference session stepped
by hand (checked against `LoadedBlocks`) and greedy generations on the local socket (checked
against transformers). A monitor samples the daemons' RSS; logs are scanned for crashes.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import psutil
import torch
import trio

import wire
from peerd.config import NodeConfig
from peerd.framed import ConnectionLost, FramedChannel, Libp2pByteStream, TrioByteStream
from peerd.server.block_server import INFERENCE_PROTOCOL, RPC_PROTOCOL
from tests import fuzz_frames as ff
from tests.fuzz_report import Report
from tests.launcher import HarnessGroup
from wire import local as api

NUM_BLOCKS = 4
DEADLINE = 60.0  # a reply (or the daemon hanging up) later than this is a hang
TCP_LINGER = 15.0  # a raw connection we half-closed must be closed by the daemon by then
CRASH_PATTERNS = ("request handler failed", "local API request failed", "Traceback")
SHARES = {"peer": 0.87, "local": 0.10, "tcp": 0.03}


class Fuzz:
    def __init__(
        self, root: Path, frames: int, seed: int, *, identities: int, workers: int,
        shares: dict[str, float] | None = None,
    ):  # fmt: skip
        self.root, self.seed = Path(root), seed
        self.identities, self.workers = identities, workers
        shares = shares or SHARES
        self.budget = {t: int(frames * shares.get(t, 0.0)) + 1 for t in SHARES}
        self.report = Report()
        self.kind_turn = Counter()

    # ----- budget ----------------------------------------------------------------------
    def take(self, target: str) -> bool:
        if self.budget[target] <= 0:
            return False
        self.budget[target] -= 1
        return True

    def next_kind(self, target: str, kinds: tuple[str, ...]) -> str:
        self.kind_turn[target] += 1
        return kinds[self.kind_turn[target] % len(kinds)]

    def count(self, target: str, shot: ff.Shot) -> None:
        self.report.frames[target] += 1
        self.report.per_type[(target, shot.kind)] += 1

    # ----- reading answers ---------------------------------------------------------------
    async def expect(self, channel: FramedChannel, shot: ff.Shot, where: str, half_close) -> bool:
        """Check the daemon's answers to `shot`; True when the stream can go on being used."""
        try:
            with trio.fail_after(DEADLINE):
                parsed = iter(shot.parsed)
                for event in shot.events:
                    if event == "close":
                        await self.read_to_end(channel)
                        return False
                    message = await self.read_reply(channel)
                    if isinstance(message, api.GeneratedToken):
                        while isinstance(message, api.GeneratedToken):
                            message = await self.read_reply(channel)
                    if isinstance(message, api.ChainOpened):
                        self.ctx_chains[id(channel)][message.chain_id] = 1
                    if isinstance(message, wire.SessionOpened):
                        self.sessions[id(channel)] = True
                    next(parsed, None)
                if shot.partial:
                    await half_close()
                    await self.read_to_end(channel)
                    return False
                return True
        except trio.TooSlowError:
            self.report.hangs.append(f"{where} {shot.kind}/{shot.mode} {shot.data[:60]!r}")
            return False
        except ConnectionLost as exc:
            self.report.unexpected.append(
                f"{where} {shot.kind}/{shot.mode}: closed ({exc}) before {shot.events}"
            )
            return False
        except wire.WireError as exc:
            self.report.unexpected.append(f"{where}: unreadable reply {exc}")
            return False

    async def read_reply(self, channel: FramedChannel) -> wire.Message:
        message = wire.parse_message(await channel.read_message())
        self.report.replies += 1
        if isinstance(message, wire.Error):
            self.report.refusals[message.code] += 1
        return message

    async def read_to_end(self, channel: FramedChannel) -> None:
        while True:
            try:
                await self.read_reply(channel)
            except ConnectionLost:
                return

    # ----- peer targets --------------------------------------------------------------------
    async def peer_worker(self, node, server_id: str, ctx0: ff.Context, rng: random.Random):
        while self.budget["peer"] > 0:
            kind = self.next_kind("peer", ff.PEER_TYPES)
            inference_kind = kind in ("open_session", "step", "close_session") or (
                kind == "ping" and rng.random() < 0.5
            )
            inference = inference_kind != (rng.random() < 0.15)
            protocol = INFERENCE_PROTOCOL if inference else RPC_PROTOCOL
            try:
                with trio.fail_after(DEADLINE):
                    stream = await node.open_stream(server_id, protocol)
            except Exception as exc:  # noqa: BLE001 - a refusal to open counts, not a crash
                self.report.stream_open_failures[type(exc).__name__] += 1
                await trio.sleep(0.5)
                continue
            channel = FramedChannel(Libp2pByteStream(stream), wire.DEFAULT_MAX_FRAME)
            self.ctx_chains[id(channel)] = {}
            ctx = ff.Context(**{**ctx0.__dict__, "chains": {}})
            try:
                if inference and rng.random() < 0.35:  # a real session for the steps to hit
                    opened = ff.peer_message(rng, "open_session", ctx)
                    shot = ff.predict(ff.mutate(rng, opened, "valid", ctx), ctx.max_frame,
                                      inference=True)  # fmt: skip
                    shot.kind, shot.mode = "open_session", "valid"
                    if not self.take("peer"):
                        break
                    await channel.stream.send_all(shot.data)
                    self.count("peer", shot)
                    if not await self.expect(channel, shot, "peer", stream.close):
                        continue
                    ctx.batch = opened.batch_size
                for _ in range(rng.randint(1, 12)):
                    if not self.take("peer"):
                        break
                    shot = ff.make_shot(rng, kind, ctx, local=False, inference=inference)
                    await channel.stream.send_all(shot.data)
                    self.count("peer", shot)
                    if not await self.expect(channel, shot, f"peer{protocol}", stream.close):
                        break
                    kind = self.next_kind("peer", ff.PEER_TYPES)  # any type, any protocol
            except ConnectionLost as exc:
                self.report.unexpected.append(f"peer: write failed {exc}")
            finally:
                self.ctx_chains.pop(id(channel), None)
                with trio.move_on_after(5):
                    await stream.reset()

    # ----- the local socket ------------------------------------------------------------
    async def local_worker(self, socket_path: Path, ctx0: ff.Context, rng: random.Random):
        while self.budget["local"] > 0:
            stream = await trio.open_unix_socket(str(socket_path))
            channel = FramedChannel(TrioByteStream(stream), wire.DEFAULT_MAX_FRAME)
            chains: dict[str, int] = {}
            self.ctx_chains[id(channel)] = chains
            ctx = ff.Context(**{**ctx0.__dict__, "chains": chains})
            try:
                for _ in range(rng.randint(1, 15)):
                    if not self.take("local"):
                        break
                    kind = self.next_kind("local", ff.LOCAL_TYPES)
                    shot = ff.make_shot(rng, kind, ctx, local=True, inference=False)
                    await channel.stream.send_all(shot.data)
                    self.count("local", shot)
                    if not await self.expect(channel, shot, "local", stream.send_eof):
                        break
            except ConnectionLost as exc:
                self.report.unexpected.append(f"local: write failed {exc}")
            finally:
                self.ctx_chains.pop(id(channel), None)
                await stream.aclose()

    # ----- raw TCP before the handshake --------------------------------------------------
    async def tcp_worker(self, port: int, rng: random.Random) -> None:
        frame = ff.frame_of(ff.pack(ff.plain(wire.Info().to_wire())))
        while self.take("tcp"):
            data = ff.tcp_garbage(rng, frame)
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError as exc:
                self.report.stream_open_failures[f"tcp {type(exc).__name__}"] += 1
                await trio.sleep(0.5)
                continue
            self.report.frames["tcp"] += 1
            self.report.per_type[("tcp", "pre-handshake")] += 1
            try:
                await stream.send_all(data)
                if rng.random() < 0.5:
                    await stream.send_eof()
                    with trio.move_on_after(TCP_LINGER) as linger:
                        while await stream.receive_some(65536):
                            pass
                    self.report.tcp_lingering += linger.cancelled_caught
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                await stream.aclose()

    # ----- well-behaved sessions ---------------------------------------------------------
    async def good_session(self, node, server_id: str, reference, hidden_size: int) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        chunks = [torch.randn(1, n, hidden_size, generator=gen) for n in (5, 1, 1, 3, 1, 1)]
        expected = reference.forward(torch.cat(chunks, dim=1))
        length = sum(c.shape[1] for c in chunks)
        while not self.done.is_set():
            stream = await node.open_stream(server_id, INFERENCE_PROTOCOL)
            channel = FramedChannel(Libp2pByteStream(stream), wire.DEFAULT_MAX_FRAME)
            try:
                with trio.fail_after(DEADLINE):
                    await channel.write_message(
                        wire.OpenSession(server_model := self.model_id, 0, NUM_BLOCKS, length,
                                         1, "none", f"good-{time.monotonic_ns()}").to_wire()
                    )  # fmt: skip
                    opened = wire.parse_message(await channel.read_message())
                    assert isinstance(opened, wire.SessionOpened), (opened, server_model)
                    position = 0
                    for step_id, chunk in enumerate(chunks):
                        await channel.write_message(wire.Step(chunk, step_id).to_wire())
                        result = wire.parse_message(await channel.read_message())
                        if not isinstance(result, wire.StepResult):
                            self.report.good_mismatches.append(f"step {step_id}: {result!r:.200}")
                            break
                        want = expected[:, position : position + chunk.shape[1]]
                        position += chunk.shape[1]
                        if not torch.allclose(result.hidden, want, atol=1e-5, rtol=1e-5):
                            diff = (result.hidden - want).abs().max().item()
                            self.report.good_mismatches.append(f"step {step_id}: diff {diff}")
                        self.report.good_steps += 1
                    await channel.write_message(wire.CloseSession().to_wire())
            except trio.TooSlowError:
                self.report.hangs.append("well-behaved inference session")
            except (ConnectionLost, AssertionError, wire.WireError) as exc:
                self.report.good_mismatches.append(f"session: {exc!r:.200}")
            finally:
                await stream.reset()

    async def good_generations(self, socket_path: Path, model_ref: str, prompt, expected):
        while not self.done.is_set():
            stream = await trio.open_unix_socket(str(socket_path))
            channel = FramedChannel(TrioByteStream(stream), wire.DEFAULT_MAX_FRAME)
            request = api.Generate(
                model_ref, input_ids=prompt, max_new_tokens=len(expected), eos_token_id=[]
            )
            try:
                with trio.fail_after(DEADLINE * 2):
                    await channel.write_message(request.to_wire())
                    while True:
                        message = wire.parse_message(await channel.read_message())
                        if not isinstance(message, api.GeneratedToken):
                            break
                if not isinstance(message, api.GenerationDone):
                    self.report.good_mismatches.append(f"generate: {message!r:.200}")
                elif message.token_ids != expected:
                    self.report.good_mismatches.append(f"generate: {message.token_ids}")
                self.report.good_generations += 1
            except trio.TooSlowError:
                self.report.hangs.append("well-behaved generation")
            except (ConnectionLost, wire.WireError) as exc:
                self.report.good_mismatches.append(f"generate: {exc!r:.200}")
            finally:
                await stream.aclose()

    # ----- monitoring ------------------------------------------------------------------
    async def monitor(self, daemons) -> None:
        procs = {d.name: psutil.Process(d.pid) for d in daemons}
        for name, proc in procs.items():
            self.report.start_rss[name] = proc.memory_info().rss
        while True:
            for name, proc in procs.items():
                try:
                    rss, fds = proc.memory_info().rss, proc.num_fds()
                except psutil.Error:
                    continue
                self.report.peak_rss[name] = max(self.report.peak_rss.get(name, 0), rss)
                self.report.peak_fds[name] = max(self.report.peak_fds.get(name, 0), fds)
            await trio.sleep(0.2)

    # ----- the whole run -----------------------------------------------------------------
    def run(self, progress: float = 30.0) -> Report:
        from blocks import LoadedBlocks, checkpoint_fingerprint
        from tests.tiny_models import load_reference, make_tiny_model

        model = make_tiny_model(self.root / "tiny", "llama", num_layers=NUM_BLOCKS)
        self.model_id = f"{model.name}@{checkpoint_fingerprint(model)}"
        reference = LoadedBlocks.load(model, 0, NUM_BLOCKS)
        prompt = [5, 17, 42, 7, 99, 3]
        new = 8
        out = load_reference(model).generate(
            torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
        expected = out[0, len(prompt) :].tolist()
        with HarnessGroup(self.root / "homes", announce_period=5.0) as group:
            server = group.spawn(
                "server", str(model), "--blocks", f"0:{NUM_BLOCKS}", "--new-swarm",
                "--rebalance-period", "0", "--idle-timeout", "30", command="serve",
            )  # fmt: skip
            server.wait_ready()
            client = group.spawn("client", "--initial-peers", server.addrs[0])
            server.wait_online()
            client.wait_ready()
            daemons = [server, client]
            began = time.monotonic()
            trio.run(self._main, server, client, model, reference, prompt, expected, progress)
            self.report.seconds = time.monotonic() - began
            time.sleep(1.0)
            for d in daemons:
                self.report.exited[d.name] = d.proc.poll()
                self.report.crashes[d.name] = [
                    line for line in d.log_text().splitlines()
                    if any(p in line for p in CRASH_PATTERNS)
                ]  # fmt: skip
        return self.report

    async def _main(self, server, client, model, reference, prompt, expected, progress):
        from peerd.node import Node

        self.done = trio.Event()
        self.ctx_chains: dict[int, dict] = {}
        self.sessions: dict[int, bool] = {}
        port = int(server.addrs[0].split("/tcp/")[1].split("/")[0])
        hidden = reference.config.hidden_size
        ctx = ff.Context(self.model_id, str(model), hidden, NUM_BLOCKS)
        nodes = [
            Node(NodeConfig(home=self.root / f"fuzzer-{i}", host="127.0.0.1",
                            initial_peers=[server.addrs[0]], announce_period=5.0,
                            reachability="private"))
            for i in range(self.identities + 1)
        ]  # fmt: skip
        async with trio.open_nursery() as outer:
            for node in nodes:
                await outer.start(node.run)
            outer.start_soon(self.monitor, [server, client])
            outer.start_soon(self.good_session, nodes[0], server.peer_id, reference, hidden)
            outer.start_soon(self.good_generations, client.socket, str(model), prompt, expected)
            outer.start_soon(self._progress, progress)
            async with trio.open_nursery() as fuzzers:
                for i in range(self.workers):
                    rng = random.Random(self.seed * 1000 + i)
                    node = nodes[1 + i % self.identities]
                    fuzzers.start_soon(self.peer_worker, node, server.peer_id, ctx, rng)
                for i in range(max(1, self.workers // 3 if self.budget["local"] < 20000 else 4)):
                    rng = random.Random(self.seed * 1000 + 500 + i)
                    fuzzers.start_soon(self.local_worker, client.socket, ctx, rng)
                fuzzers.start_soon(self.tcp_worker, port, random.Random(self.seed * 1000 + 999))
            self.done.set()
            await trio.sleep(DEADLINE / 4)  # let the well-behaved loops finish a round
            for node in nodes:
                with trio.move_on_after(10):
                    await node.shutdown()
            outer.cancel_scope.cancel()

    async def _progress(self, every: float) -> None:
        while True:
            await trio.sleep(every)
            r = self.report
            print(
                f"[{time.strftime('%H:%M:%S')}] frames {dict(r.frames)} hangs {len(r.hangs)} "
                f"unexpected {len(r.unexpected)} good {r.good_steps}/{r.good_generations} "
                f"peak RSS MiB { {k: v >> 20 for k, v in r.peak_rss.items()} }",
                flush=True,
            )

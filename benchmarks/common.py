"""Shared pieces of the swarm benchmarks: the reference setup, a loopback swarm, the local baseline.

The reference setup (issue 5) keeps figures comparable from run to run: a random-weight Llama
(vocab 32000, hidden 1024, intermediate 2816, 12 layers, 8 heads, 8 KV heads, float32, seed 0),
one torch thread per process, servers on blocks 0:4, 4:8 and 8:12 on loopback behind a
bootstrap `peerd join --new-swarm` whose socket the client uses, a prompt of 8 tokens and 128
new tokens, greedy; medians of 3 runs after a warm-up. `--quick` shrinks all of it to a smoke
run that only checks the benchmarks still work.
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from blocks import ClientParts, LoadedBlocks
from peerd.client import DaemonClient
from peerd.demo.tiny import TinyLlama, write_tiny_llama
from peerd.generation import Generation as Engine
from peerd.generation import GenerationParams, LocalStep, run_sync
from tests.launcher import DaemonProcess
from tests.launcher import HarnessGroup as DaemonGroup

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Setup:
    """Everything that decides what a figure means; printed and stored with the results."""

    model: TinyLlama
    splits: tuple[tuple[int, int], ...]
    prompt_tokens: int = 8
    new_tokens: int = 128
    runs: int = 3
    warmup: int = 1
    batches: tuple[int, ...] = (1, 8)
    seq_len: int = 128
    threads: int = 1
    announce_period: float = 30.0  # the CLI default; state changes are announced at once anyway

    def to_dict(self) -> dict:
        out = asdict(self)
        out["model"] = asdict(self.model)
        return out


REFERENCE = Setup(
    model=TinyLlama(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_layers=12,
        num_heads=8,
        num_kv_heads=8,
        seed=0,
    ),
    splits=((0, 4), (4, 8), (8, 12)),
)
QUICK = Setup(
    model=TinyLlama(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=704,
        num_layers=12,
        num_heads=8,
        num_kv_heads=8,
        seed=0,
    ),
    splits=((0, 4), (4, 8), (8, 12)),
    new_tokens=16,
    runs=1,
    seq_len=32,
    announce_period=5.0,  # dead servers' records expire sooner: shorter waits in the recovery runs
)


def setup_for(quick: bool) -> Setup:
    return QUICK if quick else REFERENCE


def limit_threads(threads: int) -> None:
    """One torch thread in this process too (set the env before torch spins up its pools)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)


# ----- the checkpoint ---------------------------------------------------------------------


def model_dir_for(setup: Setup, cache_root: Path) -> Path:
    """Write the setup's checkpoint once under `cache_root` (keyed by its shape) and reuse it."""
    shape = setup.model
    name = (
        f"llama-v{shape.vocab_size}-h{shape.hidden_size}-f{shape.intermediate_size}"
        f"-l{shape.num_layers}-a{shape.num_heads}-kv{shape.num_kv_heads}-s{shape.seed}"
    )
    path = Path(cache_root) / name
    if not (path / "model.safetensors").exists() or not (path / "tokenizer.json").exists():
        write_tiny_llama(path.with_suffix(".tmp"), shape)
        os.replace(path.with_suffix(".tmp"), path)
    return path


# ----- statistics and printing ----------------------------------------------------------


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def repeat(fn: Callable[[], float], runs: int, warmup: int) -> list[float]:
    """Call `fn` warmup + runs times; the values of the timed runs."""
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(runs)]


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def write_json(path: Path | None, results: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"results written to {path}")


# ----- the local baseline -----------------------------------------------------------------


@dataclass
class Generation:
    """Tokens of one greedy generation and when each arrived (seconds from its start)."""

    tokens: list[int]
    times: list[float]
    total: float
    extra: dict = field(default_factory=dict)

    @property
    def steps_per_s(self) -> float:
        """End to end: every step (prefill included) over the whole time."""
        return len(self.tokens) / self.total

    @property
    def decode_steps_per_s(self) -> float:
        """Steady state: the one-token steps after the first token."""
        if len(self.times) < 2:
            return float("nan")
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def fixed_length(new_tokens: int) -> GenerationParams:
    """Greedy, exactly `new_tokens` tokens (no EOS stop): every run does the same steps."""
    return GenerationParams(max_new_tokens=new_tokens, eos_token_id=())


class SingleProcessModel:
    """The whole model in this process: the baseline every swarm figure is divided by."""

    def __init__(self, model_dir: Path) -> None:
        self.parts = ClientParts.load(model_dir)
        self.span = LoadedBlocks.load(model_dir, 0, self.parts.config.num_blocks)

    def generate(self, prompt: list[int], new_tokens: int) -> Generation:
        vocab = self.parts.config.vocab_size
        began = time.perf_counter()
        gen = Engine([prompt], fixed_length(new_tokens), vocab_size=vocab)
        times: list[float] = []
        with torch.no_grad():
            for _ in run_sync(gen, LocalStep(self.parts, self.span, gen.max_length)):
                times.append(time.perf_counter() - began)
        return Generation(gen.result()[0].token_ids, times, time.perf_counter() - began)


def pick_prompt(
    local: SingleProcessModel, setup: Setup, eos: int = 2
) -> tuple[list[int], list[int]]:
    """A fixed prompt whose greedy continuation has no EOS (the daemon's generate stops there)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        prompt = torch.randint(
            3, setup.model.vocab_size, (setup.prompt_tokens,), generator=g
        ).tolist()
        reference = local.generate(prompt, setup.new_tokens).tokens
        if eos not in reference:
            return prompt, reference
    raise RuntimeError("every prompt tried reaches EOS")


# ----- a swarm on loopback ------------------------------------------------------------------


class Swarm:
    """A bootstrap daemon (the client's socket) and servers of one checkpoint, all stopped on exit."""

    def __init__(
        self, root: Path, model_dir: Path, setup: Setup, *, profile_dir: Path | None = None
    ) -> None:
        """`profile_dir`: run the bootstrap and the middle split's server under cProfile there."""
        self.root = Path(root)
        self.model_dir = Path(model_dir)
        self.setup = setup
        self.profile_dir = profile_dir
        self.group = DaemonGroup(
            self.root, announce_period=setup.announce_period, threads=setup.threads
        )
        self.boot: DaemonProcess | None = None
        self.servers: dict[str, DaemonProcess] = {}
        self._names = 0

    def __enter__(self) -> Swarm:
        try:
            self.boot = self._spawn("bootstrap", "--new-swarm", profile=True).wait_ready()
            middle = len(self.setup.splits) // 2
            pending = [
                self.spawn_server(a, b, profile=i == middle)
                for i, (a, b) in enumerate(self.setup.splits)
            ]
            for daemon in pending:
                self.wait_online(daemon)
        except BaseException:
            self.group.stop_all()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.group.stop_all()

    @property
    def peer(self) -> DaemonClient:
        assert self.boot is not None
        return DaemonClient(self.boot.socket)

    def spawn_server(
        self, start: int, end: int, *, name: str | None = None, profile: bool = False
    ) -> DaemonProcess:
        assert self.boot is not None
        self._names += 1
        name = name or f"server{self._names}-{start}-{end}"
        daemon = self._spawn(
            name,
            str(self.model_dir),
            "--blocks",
            f"{start}:{end}",
            "--initial-peers",
            self.boot.addrs[0],
            "--rebalance-period",
            "0",
            command="serve",
            profile=profile,
        )
        self.servers[name] = daemon
        return daemon

    def _spawn(self, name: str, *args: str, command: str = "join", profile: bool) -> DaemonProcess:
        if not profile or self.profile_dir is None:
            return self.group.spawn(name, *args, command=command)
        return spawn_profiled(
            self.group, name, self.profile_dir / f"{name}.prof", *args, command=command
        )

    def wait_online(self, daemon: DaemonProcess, timeout: float = 120.0) -> None:
        """Until the bootstrap's socket lists the server as ONLINE (what a client sees)."""
        daemon.wait_ready(timeout)
        daemon.wait_online(timeout)
        deadline = time.monotonic() + timeout
        while daemon.peer_id not in self.online_peers():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{daemon.name} not listed ONLINE by the bootstrap after {timeout:.0f} s"
                )
            time.sleep(0.5)

    def online_peers(self) -> set[str]:
        models = self.peer.models()
        return {
            s["peer_id"] for m in models.values() for s in m["servers"] if s["state"] == "ONLINE"
        }

    def cpu_snapshot(self) -> dict[str, float]:
        """CPU seconds used so far by every live daemon of the swarm, by name."""
        daemons = [self.boot, *self.servers.values()]
        out = {
            d.name: cpu_seconds(d.pid) for d in daemons if d is not None and d.proc.poll() is None
        }
        return {name: t for name, t in out.items() if t is not None}

    def by_peer(self, peer_id: str) -> DaemonProcess | None:
        return next((d for d in self.servers.values() if d.peer_id == peer_id), None)


def spawn_profiled(
    group: DaemonGroup, name: str, out: Path, *args: str, command: str = "join"
) -> DaemonProcess:
    """Like `DaemonGroup.spawn`, under `python -m cProfile -o out` (written when it exits cleanly).

    cProfile sees the trio thread only: what is left is the event loop's own work, with the
    compute (worker threads) showing up as time waiting in the loop.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    profiler = [sys.executable, "-m", "cProfile", "-o", str(out)]
    return group.spawn(name, *args, command=command, interpreter=profiler)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), from /proc; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before if k in after}


class LogWatcher:
    """Timestamps the lines a daemon writes to its log, as they appear (the log says only seconds)."""

    def __init__(self, path: Path, interval: float = 0.005, *, from_start: bool = True) -> None:
        self.path = Path(path)
        self.interval = interval
        self._offset = 0 if from_start or not self.path.exists() else self.path.stat().st_size
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.seen: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LogWatcher:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, str]]:
        self._stop.set()
        self._thread.join(2)
        return self.seen

    def first(self, needle: str) -> float | None:
        return next((t for t, line in list(self.seen) if needle in line), None)

    def _run(self) -> None:
        offset = self._offset
        partial = b""
        while not self._stop.is_set():
            try:
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                data = b""
            now = time.monotonic()
            if data:
                offset += len(data)
                chunks = (partial + data).split(b"\n")
                partial = chunks.pop()
                for raw in chunks:
                    self.seen.append((now, raw.decode(errors="replace")))
            time.sleep(self.interval)


def python_env(threads: int) -> dict:
    env = dict(
        os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1"
    )
    env.pop("PEERD_INITIAL_PEERS", None)
    return env


def time_python(code: str, threads: int = 1, runs: int = 3) -> float:
    """Median wall seconds of `python -c code` (interpreter start included)."""
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            cwd=REPO,
            env=python_env(threads),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        times.append(time.monotonic() - t0)
    return median(times)


def _timed(fn: Callable[[], object]) -> float:
    """CPU seconds of this process (one torch thread): other work on the machine adds none."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def interleaved(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Seconds of each function per run, the functions taking turns (load hits them alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return times


def best_and_median(times: list[float]) -> tuple[float, float]:
    return min(times), statistics.median(times)

"""Swarm benchmarks (issue 5): a loopback swarm against the same model in one process.

Four figures, each a ratio against a baseline measured in the same run:

1. inference: greedy generation steps/s through the swarm ÷ local generation steps/s (the
   whole model in this process: `LoadedBlocks` over every block + `ClientParts`, KV cache, same loop),
   both for the `DaemonClient.session` path (embeddings and head here, hidden states through the
   socket) and the daemon-side `generate` path (token ids in, tokens streamed back);
2. forward: tokens/s of `peer.forward` for batches 1×128 and 8×128 ÷ local `LoadedBlocks.forward`;
3. startup: seconds from launching `peerd serve` to its record being listed ONLINE, cold
   (fingerprint and throughput measured) and warm (restart with the cached ones), against the
   cost of importing torch + libp2p alone, with the time split by the daemon's log lines;
4. recovery: the extra seconds a kill -9 of the 4:8 server used by the chain costs a
   128-token generation when a spare holds 4:8 too, killed between two steps and in the
   middle of one (while the middle server computes); the cost is the failing step's excess
   over a normal step, beside the failure's detection time and the replay's compute
   (measured here). Each failure starts once the previous victim's record has expired.

Beside the ratios: where a session step's time goes (in-process compute per span, the
socket's round trip, the per-hop rest) and each daemon's CPU per one-token step (from /proc).
`--profile DIR` instead runs the bootstrap and the middle server under cProfile.

    python -m benchmarks.bench_swarm [--quick] [--only inference,forward,startup,recovery]
                                     [--out results.json] [--model-cache DIR] [--profile DIR]
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

import wire
from benchmarks.common import (
    REPO,
    Generation,
    LogWatcher,
    Setup,
    SingleProcessModel,
    Swarm,
    cpu_delta,
    fixed_length,
    limit_threads,
    load_average,
    median,
    model_dir_for,
    pick_prompt,
    python_env,
    setup_for,
    table,
    time_python,
    write_json,
)
from peerd.client import ChainSession, DaemonClient
from peerd.generation import Generation as Engine
from peerd.generation import embed_request, last_logits
from wire import local as api

BENCHMARKS = ("inference", "forward", "startup", "recovery")
IDLE_WINDOW_S = 5.0  # how long the idle swarm's CPU use is measured
LIST_POLL_S = 0.25  # between listings while waiting for ONLINE (each listing loads every daemon)


# ----- 1. sequential inference ---------------------------------------------------------------


def session_generate(
    peer: DaemonClient,
    local: SingleProcessModel,
    model_dir: Path,
    prompt: list[int],
    new_tokens: int,
    on_step: Callable[[int, ChainSession], None] | None = None,
    cpu: CpuMeter | None = None,
) -> Generation:
    """Greedy generation with the head here and the blocks through a `ChainSession`.

    Times count from the first step (the chain's open is reported apart, as `open_s`).
    `on_step(step)` runs just before step `step` (the recovery benchmark kills a server there).
    `cpu` measures the one-token steps only (from the second step to the last).
    """
    parts = local.parts
    gen = Engine([prompt], fixed_length(new_tokens), vocab_size=parts.config.vocab_size)
    t_open = time.perf_counter()
    with peer.session(model_dir, gen.max_length) as session:
        opened = time.perf_counter() - t_open
        route = list(session.route)
        began = time.perf_counter()
        hidden = embed_request(parts, gen.first_request())
        times: list[float] = []
        embed_s, request_s, head_s = [], [], []
        step = 0
        with torch.no_grad():
            while hidden is not None:
                if on_step is not None:
                    on_step(step, session)
                if cpu is not None and step == 1:
                    cpu.start()
                t0 = time.perf_counter()
                out = session.step(hidden)
                t1 = time.perf_counter()
                update = gen.feed(last_logits(parts, out))
                t2 = time.perf_counter()
                times.append(t2 - began)
                nxt = update.next
                hidden = None if nxt is None else embed_request(parts, nxt)
                embed_s.append(time.perf_counter() - t2)
                request_s.append(t1 - t0)
                head_s.append(t2 - t1)
                step += 1
        tokens = gen.result()[0].token_ids
        if cpu is not None:
            cpu.stop()
        total = time.perf_counter() - began
        extra = {
            "open_s": opened,
            "route": route,
            "final_route": list(session.route),
            "recoveries": session.recoveries,
            "request_s": request_s,
            "head_ms": median(head_s) * 1e3,
            "embed_ms": median(embed_s) * 1e3,
        }
    return Generation(tokens, times, total, extra)


def daemon_generate(
    peer: DaemonClient,
    model_dir: Path,
    prompt: list[int],
    new_tokens: int,
    cpu: CpuMeter | None = None,
) -> Generation:
    """Greedy generation done by the daemon (`Generate`), tokens streamed back; times from the
    request. `cpu` measures from the first token to the last (the one-token steps only)."""
    request = api.Generate(
        model=str(model_dir),
        input_ids=prompt,
        max_new_tokens=new_tokens,
        temperature=0.0,
        eos_token_id=[],  # exactly new_tokens steps, as the other two paths
    )
    began = time.perf_counter()
    tokens: list[int] = []
    times: list[float] = []
    done = None
    for event in peer.generate_events(request):
        if isinstance(event, api.GeneratedToken):
            tokens.append(event.token_id)
            times.append(time.perf_counter() - began)
            if cpu is not None and len(tokens) == 1:
                cpu.start()
            if cpu is not None and len(tokens) == new_tokens:
                cpu.stop()
        else:
            done = event
    total = time.perf_counter() - began
    extra = {
        "stop_reason": done.stop_reason if done else None,
        "first_token_s": times[0] if times else None,
    }
    return Generation(tokens, times, total, extra)


class CpuMeter:
    """CPU seconds each daemon (and this process) used between `start` and `stop`."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._before = self.swarm.cpu_snapshot()
        self._client = time.process_time()

    def stop(self) -> None:
        self.used = cpu_delta(self._before, self.swarm.cpu_snapshot())
        self.used["client (this process)"] = time.process_time() - self._client


def socket_ping_ms(peer: DaemonClient, rounds: int = 200) -> float:
    """Round trip of a tiny request through the local socket: the floor of every socket call."""
    with peer.connect() as conn:
        for _ in range(20):
            conn.request(wire.Ping(nonce=1), wire.Pong)
        times = []
        for i in range(rounds):
            t0 = time.perf_counter()
            conn.request(wire.Ping(nonce=i), wire.Pong)
            times.append(time.perf_counter() - t0)
    return median(times) * 1e3


def local_step_ms(
    local: SingleProcessModel, start: int, end: int, context: int, rounds: int = 30
) -> tuple[float, float]:
    """One-token step through blocks [start, end) against `context` cached tokens, in this process:
    (wall ms, CPU ms), medians."""
    span = local.span
    h = span.config.hidden_size
    cache = span.new_cache(1, context + rounds + 5, start, end)
    g = torch.Generator().manual_seed(1)
    span.step(torch.randn(1, context, h, generator=g), cache)
    x = torch.randn(1, 1, h, generator=g)
    times, cpu = [], []
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        span.step(x, cache)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return median(times) * 1e3, median(cpu) * 1e3


def bench_inference(
    swarm: Swarm, local: SingleProcessModel, setup: Setup, prompt: list[int], reference: list[int]
) -> dict:
    peer, model_dir, n = swarm.peer, swarm.model_dir, setup.new_tokens
    runs = {"local": [], "session": [], "generate": []}
    cpu = CpuMeter(swarm)

    def local_run() -> Generation:
        cpu.start()
        g = local.generate(prompt, n)
        cpu.stop()
        return g

    kinds = {
        "local": local_run,
        "session": lambda: session_generate(peer, local, model_dir, prompt, n, cpu=cpu),
        "generate": lambda: daemon_generate(peer, model_dir, prompt, n, cpu=cpu),
    }
    for rep in range(setup.warmup + setup.runs):  # round-robin: machine load hits all three alike
        for name, fn in kinds.items():
            g = fn()
            steps = n if name == "local" else n - 1  # the swarm paths: one-token steps only
            g.extra["cpu_ms_per_step"] = {k: v / steps * 1e3 for k, v in cpu.used.items()}
            if rep >= setup.warmup:
                runs[name].append(g)
            print(
                f"  inference {name:8s} run {rep}: {g.steps_per_s:6.2f} steps/s end to end, "
                f"{g.decode_steps_per_s:6.2f} decode steps/s, same tokens: {g.tokens == reference}",
                flush=True,
            )
    idle = swarm.cpu_snapshot()  # the swarm's background work, with no request in flight
    time.sleep(IDLE_WINDOW_S)
    idle_cpu = {
        k: 100 * v / IDLE_WINDOW_S for k, v in cpu_delta(idle, swarm.cpu_snapshot()).items()
    }
    out: dict = {}
    base = median(g.steps_per_s for g in runs["local"])
    base_decode = median(g.decode_steps_per_s for g in runs["local"])
    for name, gens in runs.items():
        sps = median(g.steps_per_s for g in gens)
        dsps = median(g.decode_steps_per_s for g in gens)
        out[name] = {
            "steps_per_s": sps,
            "decode_steps_per_s": dsps,
            "ratio": sps / base,
            "decode_ratio": dsps / base_decode,
            "step_ms": 1e3 / dsps,
            "runs_steps_per_s": [g.steps_per_s for g in gens],
            "same_tokens": all(g.tokens == reference for g in gens),
            "cpu_ms_per_step": {
                k: median(g.extra["cpu_ms_per_step"].get(k, 0.0) for g in gens)
                for k in gens[0].extra["cpu_ms_per_step"]
            },
        }
    out["idle_cpu_percent"] = idle_cpu
    sess = runs["session"]
    out["session"].update(
        open_s=median(g.extra["open_s"] for g in sess),
        request_ms=median(t * 1e3 for g in sess for t in g.extra["request_s"][1:]),
        head_ms=median(g.extra["head_ms"] for g in sess),
        embed_ms=median(g.extra["embed_ms"] for g in sess),
        route=sess[-1].extra["route"],
    )
    out["generate"].update(
        first_token_s=median(g.extra["first_token_s"] for g in runs["generate"]),
        stop_reason=runs["generate"][-1].extra["stop_reason"],
    )
    # where the time of one session step goes
    context = len(prompt) + n // 2
    spans = setup.splits
    per_span = [local_step_ms(local, a, b, context) for a, b in spans]
    profile = {
        "socket_ping_ms": socket_ping_ms(peer),
        "local_step_all_blocks_ms": local_step_ms(local, 0, setup.model.num_layers, context)[0],
        "local_step_per_span_ms": [wall for wall, _ in per_span],
        "local_step_per_span_cpu_ms": [cpu for _, cpu in per_span],
    }
    profile["chain_overhead_ms"] = (
        out["session"]["request_ms"] - profile["local_step_all_blocks_ms"]
    )
    profile["overhead_per_hop_ms"] = (
        profile["chain_overhead_ms"] - profile["socket_ping_ms"]
    ) / len(spans)
    out["profile"] = profile
    return out


# ----- 2. parallel forward ---------------------------------------------------------------------


def bench_forward(swarm: Swarm, local: SingleProcessModel, setup: Setup) -> dict:
    peer, span = swarm.peer, local.span
    h = span.config.hidden_size
    out: dict = {}
    shapes = [(b, setup.seq_len) for b in setup.batches] + [(1, 1)]
    for batch, length in shapes:
        x = torch.randn(batch, length, h, generator=torch.Generator().manual_seed(batch))
        local_t, swarm_t = [], []
        expected = span.forward(x)
        for rep in range(setup.warmup + setup.runs):
            t0 = time.perf_counter()
            span.forward(x)
            t1 = time.perf_counter()
            y, _ = peer.forward(swarm.model_dir, x)
            t2 = time.perf_counter()
            if rep >= setup.warmup:
                local_t.append(t1 - t0)
                swarm_t.append(t2 - t1)
        tokens = batch * length
        key = f"{batch}x{length}"
        out[key] = {
            "local_tokens_per_s": tokens / median(local_t),
            "swarm_tokens_per_s": tokens / median(swarm_t),
            "ratio": median(local_t) / median(swarm_t),
            "local_s": median(local_t),
            "swarm_s": median(swarm_t),
            "overhead_s": median(swarm_t) - median(local_t),
            "max_abs_diff": float((y - expected).abs().max()),
        }
        print(
            f"  forward {key}: local {median(local_t):.3f} s, swarm {median(swarm_t):.3f} s",
            flush=True,
        )
    return out


# ----- 3. startup --------------------------------------------------------------------------------

STARTUP_EVENTS = (
    ("listening", "listening on"),
    ("joined", "joined the swarm"),
    ("loading", "loading blocks"),
    ("loaded", "loaded "),
    ("online_log", "online: blocks"),
    ("announced_online", "announced ONLINE"),
)


def import_profile(code: str, top: int = 10) -> list[tuple[str, float]]:
    """Import seconds by top-level package (each module's own time, summed), from `-X importtime`."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=REPO,
        env=python_env(1),
        capture_output=True,
        text=True,
        check=True,
    )
    costs: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| \s*(\S+)", line)
        if m:
            root = m.group(3).split(".")[0]
            costs[root] = costs.get(root, 0.0) + int(m.group(1)) / 1e6
    return sorted(costs.items(), key=lambda kv: -kv[1])[:top]


def startup_once(swarm: Swarm, start: int, end: int, home: Path | None, name: str) -> dict:
    """Launch one `peerd serve`, time its log lines and its first ONLINE listing, then stop it."""
    t0 = time.monotonic()
    daemon = swarm.group.spawn(
        name,
        str(swarm.model_dir),
        "--blocks",
        f"{start}:{end}",
        "--initial-peers",
        swarm.boot.addrs[0],
        "--rebalance-period",
        "0",
        command="serve",
        home=home,
    )
    watcher = LogWatcher(daemon.log_path).start()
    try:
        daemon.wait_ready(120)
        ready = time.monotonic() - t0
        deadline = time.monotonic() + 120
        while daemon.peer_id not in swarm.online_peers():
            if time.monotonic() > deadline or daemon.proc.poll() is not None:
                raise RuntimeError(f"{name} never listed ONLINE; log:\n{daemon.log_tail()}")
            time.sleep(LIST_POLL_S)
        listed = time.monotonic() - t0
        time.sleep(0.1)
    finally:
        events = watcher.stop()
        daemon.terminate()
    result = {"ready_s": ready, "listed_online_s": listed}
    for key, needle in STARTUP_EVENTS:
        t = next((t for t, line in events if needle in line), None)
        result[key + "_s"] = t - t0 if t is not None else None
    return result


def bench_startup(swarm: Swarm, setup: Setup, workdir: Path) -> dict:
    a, b = setup.splits[0]
    cold, warm = [], []
    for i in range(setup.runs):
        home = workdir / f"startup-{i}"
        cold.append(startup_once(swarm, a, b, home, f"startup-cold-{i}"))
        warm.append(startup_once(swarm, a, b, home, f"startup-warm-{i}"))
        print(
            f"  startup run {i}: cold {cold[-1]['listed_online_s']:.2f} s, warm {warm[-1]['listed_online_s']:.2f} s",
            flush=True,
        )
    imports_s = time_python("import torch, libp2p", runs=setup.runs)
    daemon_imports_s = time_python(
        "import torch, libp2p, trio, cli.main, cli.serve, peerd.daemon, peerd.server.service",
        runs=setup.runs,
    )

    def med(rows: list[dict]) -> dict:
        """The median run by time to ONLINE, whole (its events stay in their real order)."""
        return sorted(rows, key=lambda r: r["listed_online_s"])[(len(rows) - 1) // 2]

    return {
        "cold": med(cold),
        "warm": med(warm),
        "runs_cold": cold,
        "runs_warm": warm,
        "import_torch_libp2p_s": imports_s,
        "import_daemon_modules_s": daemon_imports_s,
        "ratio_cold": med(cold)["listed_online_s"] / imports_s,
        "ratio_warm": med(warm)["listed_online_s"] / imports_s,
        "top_imports": import_profile(
            "import cli.main, cli.serve, peerd.daemon, peerd.server.service"
        ),
    }


# ----- 4. recovery -------------------------------------------------------------------------------


def middle_split(setup: Setup) -> tuple[int, int]:
    return setup.splits[len(setup.splits) // 2]


def recovery_run(
    swarm: Swarm,
    local: SingleProcessModel,
    setup: Setup,
    prompt: list[int],
    reference: list[int],
    mode: str | None,
    delay: float = 0.0,
) -> dict:
    """One generation; with `mode` "between" or "during", kill the middle hop's server at half way.

    "between": before the step is sent; "during": `delay` seconds after it was sent (half a
    normal step: while the middle server computes, so the chain is waiting on its stream).
    """
    a, b = middle_split(setup)
    kill_at = setup.new_tokens // 2
    info: dict = {}
    watcher = LogWatcher(swarm.boot.log_path, from_start=False).start()

    def on_step(step: int, session) -> None:
        if mode is None or step != kill_at:
            return
        victim = next(p for p, s, e in session.route if (s, e) == (a, b))
        daemon = swarm.by_peer(victim)
        info["victim"] = daemon.name
        info["victim_peer"] = victim
        if mode == "between":
            daemon.kill()
            info["killed_at"] = time.monotonic()
        else:  # in the middle of the step: while the first hop computes or the reply travels

            def later() -> None:
                time.sleep(delay)
                info["killed_at"] = time.monotonic()
                daemon.kill()

            threading.Thread(target=later, daemon=True).start()
        info["step_started"] = time.monotonic()

    gen = session_generate(
        swarm.peer, local, swarm.model_dir, prompt, setup.new_tokens, on_step=on_step
    )
    time.sleep(0.05)
    events = watcher.stop()
    result = {
        "total_s": gen.total,
        "same_tokens": gen.tokens == reference,
        "recoveries": gen.extra["recoveries"],
        "normal_step_s": median(gen.extra["request_s"][1:kill_at]),
        "requests_s": sum(gen.extra["request_s"]),  # the rest of total_s: head and embedding here
        "step_times_s": [round(t, 4) for t in gen.extra["request_s"]],
    }
    if mode is not None:
        failed = next((t for t, line in events if "failed" in line and "repairing" in line), None)
        result.update(
            victim=info.get("victim"),
            victim_peer=info.get("victim_peer"),
            failing_step_s=max(gen.extra["request_s"][kill_at : kill_at + 3]),
            kill_delay_s=delay if mode == "during" else 0.0,
            detect_s=(failed - info["killed_at"]) if failed and "killed_at" in info else None,
            detect_from_step_s=(failed - info["step_started"]) if failed else None,
            boot_log=[
                (round(t - info["killed_at"], 3), line[-200:])
                for t, line in events
                if "killed_at" in info and t >= info["killed_at"] - 0.05
            ][:40],
        )
    return result


def wait_unlisted(swarm: Swarm, peer_id: str, timeout: float) -> float:
    """Until the bootstrap no longer lists `peer_id`; the seconds waited."""
    began = time.monotonic()
    while peer_id in swarm.online_peers() and time.monotonic() - began < timeout:
        time.sleep(1.0)
    return time.monotonic() - began


def replay_compute_s(local: SingleProcessModel, setup: Setup, tokens: int, runs: int = 3) -> float:
    """What rebuilding the middle span's cache costs in compute alone: its blocks over `tokens` tokens."""
    a, b = middle_split(setup)
    h = local.span.config.hidden_size
    x = torch.randn(1, tokens, h, generator=torch.Generator().manual_seed(2))
    times = []
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        local.span.forward(x, start=a, end=b)
        times.append(time.perf_counter() - t0)
    return median(times[1:])


def bench_recovery(
    swarm: Swarm, local: SingleProcessModel, setup: Setup, prompt: list[int], reference: list[int]
) -> dict:
    a, b = middle_split(setup)
    spare = swarm.spawn_server(a, b, name="spare-0")
    swarm.wait_online(spare)
    warm = recovery_run(
        swarm, local, setup, prompt, reference, None
    )  # warm-up with the spare in the swarm
    rows: dict[str, list[dict]] = {"none": [], "between": [], "during": []}
    waits = []
    for i in range(setup.runs):
        for mode in ("between", "none", "during"):
            delay = (rows["none"] or [warm])[-1]["normal_step_s"] / 2
            row = recovery_run(
                swarm, local, setup, prompt, reference, None if mode == "none" else mode, delay
            )
            rows[mode].append(row)
            print(
                f"  recovery {mode:7s} run {i}: {row['total_s']:.2f} s, same tokens {row['same_tokens']}"
                + (
                    f", failing step {row['failing_step_s']:.2f} s, detected after {row['detect_s']}"
                    if mode != "none"
                    else ""
                ),
                flush=True,
            )
            if mode != "none":  # a new spare for the next failure
                replacement = swarm.spawn_server(a, b, name=f"spare-{mode}-{i}")
                swarm.wait_online(replacement)
                victim = row["victim_peer"]
            if mode != "between":
                # Each failure starts clean: a killed server's record stays listed until it
                # expires (two announce periods) and chains may try it again (see the report).
                waits.append(wait_unlisted(swarm, victim, 2 * setup.announce_period + 30))
    replayed = len(prompt) + setup.new_tokens // 2 - 1
    replay_s = replay_compute_s(local, setup, replayed)
    base = median(r["total_s"] for r in rows["none"])
    out: dict = {
        "no_failure_total_s": base,
        "replayed_tokens": replayed,
        "replay_compute_s": replay_s,
        "waited_for_dead_records_s": waits,
    }
    for mode in ("between", "during"):
        rs = rows[mode]
        # The failing step's excess over a normal step is what the failure cost; the difference
        # of whole-generation times says the same but carries the machine's noise of 128 steps.
        extra = median(r["failing_step_s"] - r["normal_step_s"] for r in rs)
        extra_total = median(r["total_s"] for r in rs) - base
        out[mode] = {
            "extra_s": extra,
            "extra_minus_replay_s": extra - replay_s,
            "failing_step_s": median(r["failing_step_s"] for r in rs),
            "normal_step_s": median(r["normal_step_s"] for r in rs),
            "detect_s": median(r["detect_s"] for r in rs if r["detect_s"] is not None),
            "total_s": median(r["total_s"] for r in rs),
            "extra_total_s": extra_total,
            "same_tokens": all(r["same_tokens"] for r in rs),
            "recoveries": [r["recoveries"] for r in rs],
            "runs": rs,
        }
    out["no_failure_runs"] = rows["none"]
    return out


# ----- profiling the daemons -------------------------------------------------------------------


def profile_swarm(
    setup: Setup, model_dir: Path, workdir: Path, out_dir: Path, top: int = 30
) -> str:
    """Run the bootstrap and the middle server under cProfile through a few generations.

    Only their trio threads are profiled: the listing shows where the event loop spends its
    own time (framing, codec, libp2p's yamux and Noise, trio) apart from the compute threads.
    """
    import io
    import pstats

    limit_threads(setup.threads)
    local = SingleProcessModel(model_dir)
    prompt, _ = pick_prompt(local, setup)
    with Swarm(workdir / "swarm-profiled", model_dir, setup, profile_dir=out_dir) as swarm:
        for _ in range(2):
            session_generate(swarm.peer, local, model_dir, prompt, setup.new_tokens)
        daemon_generate(swarm.peer, model_dir, prompt, setup.new_tokens)
    text = []
    views = (
        ("tottime", None),
        ("cumulative", r"/peerd/|/wire/|yamux|secure_session|noise|_threads"),
    )
    for file in sorted(out_dir.glob("*.prof")):
        for sort, pattern in views:
            stream = io.StringIO()
            stats = pstats.Stats(str(file), stream=stream).sort_stats(sort)
            stats.print_stats(*([pattern] if pattern else []), top)
            listing = re.sub(r"\S*/(site-packages|main)/", "", stream.getvalue())
            text.append(f"===== {file.name}: by {sort} =====\n{listing}")
    return "\n".join(text)


# ----- running and printing ----------------------------------------------------------------------


def run(setup: Setup, model_dir: Path, workdir: Path, only: tuple[str, ...] = BENCHMARKS) -> dict:
    limit_threads(setup.threads)
    results: dict = {"setup": setup.to_dict(), "load_before": load_average()}
    local = SingleProcessModel(model_dir)
    prompt, reference = pick_prompt(local, setup)
    results["prompt"] = prompt
    with Swarm(workdir / "swarm", model_dir, setup) as swarm:
        if "inference" in only:
            results["inference"] = bench_inference(swarm, local, setup, prompt, reference)
        if "forward" in only:
            results["forward"] = bench_forward(swarm, local, setup)
        if "startup" in only:
            results["startup"] = bench_startup(swarm, setup, workdir)
        if "recovery" in only:
            results["recovery"] = bench_recovery(swarm, local, setup, prompt, reference)
    results["load_after"] = load_average()
    return results


def report(results: dict) -> str:
    parts = []
    if "inference" in results:
        r = results["inference"]
        rows = [
            [
                name,
                r[name]["steps_per_s"],
                r[name]["ratio"],
                r[name]["decode_steps_per_s"],
                r[name]["decode_ratio"],
                r[name]["step_ms"],
                r[name]["same_tokens"],
            ]
            for name in ("local", "session", "generate")
        ]
        parts.append(
            table(
                f"1. sequential inference ({results['setup']['new_tokens']} new tokens, greedy; "
                "ratio = swarm / local, target >= 0.90)",
                [
                    "path",
                    "steps/s",
                    "ratio",
                    "decode steps/s",
                    "decode ratio",
                    "ms/step",
                    "same tokens",
                ],
                rows,
            )
        )
        p = r["profile"]
        s = r["session"]
        parts.append(
            table(
                "   where one session step goes (medians, ms)",
                ["part", "ms"],
                [
                    ["ChainStep request (socket → 3 hops → back)", s["request_ms"]],
                    ["  of which: the same 12 blocks in-process", p["local_step_all_blocks_ms"]],
                    [
                        "  of which: spans "
                        + ", ".join(f"{x:.1f}" for x in p["local_step_per_span_ms"]),
                        sum(p["local_step_per_span_ms"]),
                    ],
                    ["  overhead (request - in-process blocks)", p["chain_overhead_ms"]],
                    ["    socket round trip (Ping)", p["socket_ping_ms"]],
                    ["    per hop (overhead - socket) / hops", p["overhead_per_hop_ms"]],
                    ["client-side head (norm + LM head)", s["head_ms"]],
                    ["client-side embedding", s["embed_ms"]],
                    ["chain open (s → ms)", s["open_s"] * 1e3],
                    ["generate: time to first token (ms)", r["generate"]["first_token_s"] * 1e3],
                ],
            )
        )
        procs = list(r["session"]["cpu_ms_per_step"])
        parts.append(
            table(
                "   CPU ms per one-token step, by process (the in-process blocks: "
                + ", ".join(f"{x:.1f}" for x in p["local_step_per_span_cpu_ms"])
                + " ms per span); idle CPU % over "
                + f"{IDLE_WINDOW_S:.0f} s after the runs",
                ["process", "local", "session", "generate", "idle %"],
                [
                    [
                        name,
                        r["local"]["cpu_ms_per_step"].get(name, float("nan")),
                        r["session"]["cpu_ms_per_step"].get(name, float("nan")),
                        r["generate"]["cpu_ms_per_step"].get(name, float("nan")),
                        r["idle_cpu_percent"].get(name, float("nan")),
                    ]
                    for name in procs
                ],
            )
        )
    if "forward" in results:
        r = results["forward"]
        rows = [
            [
                k,
                v["local_tokens_per_s"],
                v["swarm_tokens_per_s"],
                v["ratio"],
                v["overhead_s"] * 1e3,
                v["max_abs_diff"],
            ]
            for k, v in r.items()
        ]
        parts.append(
            table(
                "2. parallel forward (peer.forward vs local LoadedBlocks.forward; target >= 0.95)",
                ["batch", "local tok/s", "swarm tok/s", "ratio", "overhead ms", "max |diff|"],
                rows,
            )
        )
    if "startup" in results:
        r = results["startup"]
        keys = [
            "listening_s",
            "joined_s",
            "ready_s",
            "loading_s",
            "loaded_s",
            "online_log_s",
            "announced_online_s",
            "listed_online_s",
        ]
        rows = [[k.removesuffix("_s"), r["cold"].get(k), r["warm"].get(k)] for k in keys]
        parts.append(
            table(
                f"3. `peerd serve` launch → event, seconds (target: listed ONLINE <= 5 s); "
                f"import torch+libp2p alone {r['import_torch_libp2p_s']:.2f} s, all daemon modules "
                f"{r['import_daemon_modules_s']:.2f} s; ratio cold {r['ratio_cold']:.2f}, warm {r['ratio_warm']:.2f}",
                ["event", "cold", "warm (cached fingerprint+throughput)"],
                rows,
            )
        )
        parts.append(
            table(
                "   heaviest top-level imports of the daemon (python -X importtime)",
                ["module", "s"],
                [[m, s] for m, s in r["top_imports"]],
            )
        )
    if "recovery" in results:
        r = results["recovery"]
        rows = [
            [
                mode,
                r[mode]["failing_step_s"],
                r[mode]["normal_step_s"],
                r[mode]["extra_s"],
                r["replay_compute_s"],
                r[mode]["extra_minus_replay_s"],
                r[mode]["detect_s"],
                r[mode]["total_s"],
                r[mode]["extra_total_s"],
                r[mode]["same_tokens"],
            ]
            for mode in ("between", "during")
        ]
        parts.append(
            table(
                f"4. recovery: kill -9 of the middle server at token {results['setup']['new_tokens'] // 2}"
                f", a spare on the same blocks; extra = failing step - normal step (target: detection"
                f" <= 1 s, extra - replay <= 1 s); no-failure generation {r['no_failure_total_s']:.2f} s",
                [
                    "kill",
                    "failing step s",
                    "normal step s",
                    "extra s",
                    "replay compute s",
                    "extra - replay",
                    "detect s",
                    "total s",
                    "total - no failure",
                    "same tokens",
                ],
                rows,
            )
        )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small model and few tokens: a smoke run"
    )
    parser.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        help="comma-separated subset of " + ",".join(BENCHMARKS),
    )
    parser.add_argument("--out", type=Path, help="write every figure to this JSON file")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="instead: profile the bootstrap and the middle server (cProfile files into DIR)",
    )
    parser.add_argument(
        "--model-cache", type=Path, help="keep the generated checkpoint here between runs"
    )
    args = parser.parse_args(argv)
    only = tuple(x for x in args.only.split(",") if x)
    unknown = set(only) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; choose from {BENCHMARKS}")
    setup = setup_for(args.quick)
    limit_threads(setup.threads)
    from peerd.logging import setup_logging

    setup_logging("WARNING")  # py-libp2p's routine errors stay quiet in this process too
    with tempfile.TemporaryDirectory(prefix="peerd-bench-") as tmp:
        workdir = Path(tmp)
        model_dir = model_dir_for(setup, args.model_cache or workdir / "models")
        if args.profile is not None:
            print(profile_swarm(setup, model_dir, workdir, args.profile))
            return
        results = run(setup, model_dir, workdir, only)
    results["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print()
    print(report(results))
    write_json(args.out, results)


if __name__ == "__main__":
    main()

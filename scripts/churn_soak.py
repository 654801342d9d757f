"""Churn soak: generations through a swarm whose servers are killed and restarted at random.

    sudo .venv/bin/python scripts/churn_soak.py --minutes 10

A network lab (tests/netlab.py: a namespace per daemon, 20-50 ms one-way between each pair)
holds a bootstrap, 6 servers of a tiny 8-block Llama (two of each of the spans 0:4, 2:6, 4:8)
and 4 client daemons, each driven by a client thread that generates greedily (fixed length,
token ids in) in a loop. A chaos thread kills servers (SIGKILL or SIGTERM) and restarts them
(same identity and port) at random, never more than --max-dead at once.

What must hold, judged against the soak's own record of which servers were up:
  - a generation during which the blocks stayed covered completes, with the token ids of a
    single-process run (`peerd.demo.run.local_greedy`);
  - any other generation completes identically, or fails with `no_route` naming the blocks;
  - nothing hangs: every generation ends within --deadline seconds.
A server counts as up from --settle seconds after it reported ONLINE (its record has spread)
until the moment it is sent a signal. It prints the counts, recovery times (p50/p99, from
GenerationDone.recoveries) and a section for BENCHMARKS.md; every failure is kept, with the
daemons' logs, in the work folder.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peerd.client import DaemonClient, PeerdError  # noqa: E402
from peerd.demo.processes import DaemonFailed, DaemonProcess  # noqa: E402
from peerd.demo.run import local_greedy  # noqa: E402
from peerd.demo.tiny import TinyLlama, write_tiny_llama  # noqa: E402
from tests.launcher import HarnessGroup, wait_until_listed  # noqa: E402
from tests.netlab import PORT_SLOTS, NetLab, lab_unavailable_reason  # noqa: E402
from wire.local import Generate, GenerationDone  # noqa: E402

NUM_BLOCKS = 8
SPANS = ["0:4", "0:4", "2:6", "2:6", "4:8", "4:8"]
NO_ROUTE_NAMING_BLOCKS = re.compile(r"blocks \d+\.\.\d+")


@dataclass
class Server:
    name: str
    span: tuple[int, int]
    daemon: DaemonProcess | None = None
    up: list[list[float]] = field(default_factory=list)  # [from, until) intervals, until=inf
    busy: bool = False  # being killed or started
    starts: int = 0  # each start takes the next port slot of its lab node

    def up_at(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.up)


@dataclass
class Outcome:
    client: str
    prompt: int
    began: float
    ended: float
    verdict: str  # ok | no_route (allowed) | wrong_output | hang | error | no_route_covered
    detail: str = ""
    recoveries: list[float] = field(default_factory=list)
    route: list = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace, lab: NetLab, group: HarnessGroup) -> None:
        self.args, self.lab, self.group = args, lab, group
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.servers = {
            f"s{i}": Server(f"s{i}", tuple(int(x) for x in span.split(":")))
            for i, span in enumerate(SPANS[: args.servers])
        }
        self.outcomes: list[Outcome] = []
        self.events: list[dict] = []
        self.incidents: list[str] = []  # product misbehaviour besides generations
        self.model = write_tiny_llama(Path(args.workdir) / "model", TinyLlama(num_layers=8))
        prompt_rng = random.Random(args.seed + 1)
        self.prompts = [
            [prompt_rng.randrange(3, 512) for _ in range(prompt_rng.randrange(3, 13))]
            for _ in range(8)
        ]
        self.references = [local_greedy(self.model, p, args.new_tokens) for p in self.prompts]

    # ----- the swarm ------------------------------------------------------------------
    def note(self, what: str, **details) -> None:
        with self.lock:
            self.events.append({"t": round(time.monotonic() - self.t0, 2), "what": what, **details})
        print(f"[{time.monotonic() - self.t0:7.1f}s] {what} {details or ''}", flush=True)

    def spawn_server(self, server: Server) -> DaemonProcess:
        a, b = server.span
        slot, server.starts = server.starts % PORT_SLOTS, server.starts + 1
        return self.lab.spawn(
            self.group, server.name, server.name, str(self.model), "--blocks", f"{a}:{b}",
            "--initial-peers", self.boot_addr, "--rebalance-period", "0",
            command="serve", slot=slot,
        )  # fmt: skip

    def start(self) -> None:
        self.t0 = time.monotonic()
        boot = self.lab.spawn(self.group, "boot", "boot", "--new-swarm").wait_ready()
        self.boot_addr = self.lab.addr("boot", boot.peer_id)
        for server in self.servers.values():
            server.daemon = self.spawn_server(server)
        self.clients = {
            name: self.lab.spawn(self.group, name, name, "--initial-peers", self.boot_addr)
            for name in self.client_names
        }
        for server in self.servers.values():
            server.daemon.wait_online()
        for daemon in self.clients.values():
            wait_until_listed(DaemonClient(daemon.wait_ready().socket), len(self.servers), 120)
        now = time.monotonic()
        for server in self.servers.values():
            server.up.append([now, float("inf")])
        self.note("swarm ready", seconds=round(now - self.t0, 1))

    @property
    def client_names(self) -> list[str]:
        return [f"c{i}" for i in range(self.args.clients)]

    def covered(self, t: float) -> bool:
        spans = sorted(s.span for s in self.servers.values() if s.up_at(t))
        reach = 0
        for a, b in spans:
            if a > reach:
                return False
            reach = max(reach, b)
        return reach >= NUM_BLOCKS

    def covered_throughout(self, began: float, ended: float) -> bool:
        with self.lock:
            edges = {t for s in self.servers.values() for iv in s.up for t in iv}
            return all(self.covered(t) for t in {began} | {t for t in edges if began < t <= ended})

    # ----- chaos ----------------------------------------------------------------------
    def chaos(self) -> None:
        args = self.args
        while not self.stop.wait(self.rng.uniform(args.min_gap, args.max_gap)):
            with self.lock:
                idle = [s for s in self.servers.values() if not s.busy]
                alive = [s for s in idle if s.daemon is not None]
                dead = [s for s in idle if s.daemon is None]
                dead_count = sum(s.daemon is None or s.busy for s in self.servers.values())
                restart = dead and (dead_count >= args.max_dead or self.rng.random() < 0.5)
                if not restart and (not alive or dead_count >= args.max_dead):
                    continue
                victim = self.rng.choice(dead if restart else alive)
                victim.busy = True
                hard = self.rng.random() < 0.5
                if not restart:
                    victim.up[-1][1] = min(victim.up[-1][1], time.monotonic())
            work = self.restart if restart else (self.kill if hard else self.terminate)
            threading.Thread(target=work, args=(victim,), daemon=True).start()

    def kill(self, server: Server) -> None:
        self.note("kill -9", server=server.name)
        server.daemon.kill()
        self.gone(server)

    def terminate(self, server: Server) -> None:
        self.note("SIGTERM", server=server.name)
        began = time.monotonic()
        code = server.daemon.terminate(timeout=self.args.term_grace)
        seconds = time.monotonic() - began
        if code == -signal.SIGKILL:
            self.incident(f"{server.name} ignored SIGTERM for {seconds:.0f} s (killed)", server)
        elif code != 0:
            self.incident(f"{server.name} exited with {code} after SIGTERM", server)
        self.note("exited", server=server.name, code=code, seconds=round(seconds, 1))
        self.gone(server)

    def gone(self, server: Server) -> None:
        with self.lock:
            server.daemon, server.busy = None, False

    def restart(self, server: Server) -> None:
        self.note("restart", server=server.name)
        daemon = self.spawn_server(server)
        try:
            daemon.wait_online(timeout=120)
        except DaemonFailed as exc:
            self.incident(f"{server.name} did not come back online: {exc}"[:2000], None)
            daemon.kill()
            daemon = None
        with self.lock:
            server.daemon, server.busy = daemon, False
            if daemon is not None:
                server.up.append([time.monotonic() + self.args.settle, float("inf")])
        if daemon is not None:
            self.note("online", server=server.name)

    def incident(self, text: str, server: Server | None) -> None:
        log = f" (log: {server.daemon.log_path})" if server and server.daemon else ""
        with self.lock:
            self.incidents.append(text + log)
        self.note("INCIDENT", text=text[:300])

    # ----- clients --------------------------------------------------------------------
    def client(self, name: str) -> None:
        rng = random.Random(f"{self.args.seed}-{name}")
        daemon = DaemonClient(self.clients[name].socket, timeout=self.args.deadline)
        while not self.stop.is_set():
            index = rng.randrange(len(self.prompts))
            outcome = self.generate(name, daemon, index)
            with self.lock:
                self.outcomes.append(outcome)
            if outcome.verdict not in ("ok", "no_route"):
                self.note("FAILURE", client=name, verdict=outcome.verdict, detail=outcome.detail)
            elif outcome.verdict == "no_route":
                time.sleep(1.0)  # don't spin while the blocks are uncovered

    def generate(self, name: str, daemon: DaemonClient, index: int) -> Outcome:
        request = Generate(
            model=str(self.model),
            input_ids=self.prompts[index],
            max_new_tokens=self.args.new_tokens,
            eos_token_id=[],
        )
        began = time.monotonic()
        out = Outcome(name, index, began, began, "error")
        done = None
        try:
            for event in daemon.generate_events(request):
                if time.monotonic() - began > self.args.deadline:
                    raise TimeoutError("past the deadline")
                done = event if isinstance(event, GenerationDone) else done
        except (TimeoutError, OSError) as exc:
            out.verdict, out.detail = "hang", f"{type(exc).__name__}: {exc}"
        except PeerdError as exc:
            code = getattr(exc.code, "value", str(exc.code))
            out.detail = f"{code}: {exc.message}"
            if code == "no_route" and NO_ROUTE_NAMING_BLOCKS.search(exc.message):
                out.verdict = "no_route"
        out.ended = time.monotonic()
        if out.ended - began > self.args.deadline:
            done, out.verdict = None, "hang"
            out.detail = out.detail or f"took {out.ended - began:.0f} s"
        if done is not None:
            out.route = [list(h) for h in done.route]
            out.recoveries = [float(r["seconds"]) for r in done.recoveries]
            same = list(done.token_ids) == self.references[index]
            out.verdict = "ok" if same else "wrong_output"
            if not same:
                out.detail = f"got {list(done.token_ids)}, want {self.references[index]}"
        if out.verdict == "no_route" and self.covered_throughout(began, out.ended):
            out.verdict = "no_route_covered"
        out.began, out.ended = began - self.t0, out.ended - self.t0
        return out

    # ----- the run --------------------------------------------------------------------
    def run(self) -> dict:
        self.start()
        threads = [threading.Thread(target=self.client, args=(c,)) for c in self.client_names]
        threads.append(threading.Thread(target=self.chaos))
        for thread in threads:
            thread.start()
        try:
            self.stop.wait(self.args.minutes * 60)
        finally:
            self.stop.set()
            for thread in threads:
                thread.join()
        return self.summary()

    def summary(self) -> dict:
        verdicts = [o.verdict for o in self.outcomes]
        recoveries = sorted(r for o in self.outcomes for r in o.recoveries)
        kills = [e["what"] for e in self.events]
        return {
            "sessions": len(self.outcomes),
            "completed_identical": verdicts.count("ok"),
            "no_route_allowed": verdicts.count("no_route"),
            "failures": sum(v not in ("ok", "no_route") for v in verdicts),
            "failures_by_kind": {
                v: verdicts.count(v) for v in sorted(set(verdicts)) if v not in ("ok", "no_route")
            },
            "recoveries": len(recoveries),
            "recovery_p50_s": _quantile(recoveries, 0.50),
            "recovery_p99_s": _quantile(recoveries, 0.99),
            "recovery_max_s": max(recoveries, default=None),
            "generation_p50_s": _quantile(sorted(o.ended - o.began for o in self.outcomes), 0.5),
            "kills_9": kills.count("kill -9"),
            "sigterms": kills.count("SIGTERM"),
            "restarts": kills.count("restart"),
            "incidents": self.incidents,
        }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1], 3)


def markdown(args: argparse.Namespace, s: dict) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    fails = ", ".join(f"{k} {v}" for k, v in s["failures_by_kind"].items()) or "none"
    return "\n".join(
        [
            f"## Churn soak (`python scripts/churn_soak.py --minutes {args.minutes:g}`)",
            "",
            f"{when}; {args.servers} servers of a tiny 8-block Llama (spans "
            f"{', '.join(SPANS[: args.servers])}), {args.clients} client daemons generating "
            f"{args.new_tokens} greedy tokens in a loop, one-way latency {args.min_latency:g}-"
            f"{args.max_latency:g} ms per pair (tests/netlab.py), a kill -9 or SIGTERM or restart "
            f"every {args.min_gap:g}-{args.max_gap:g} s, at most {args.max_dead} servers down.",
            "",
            "| sessions | identical | no_route (blocks uncovered) | failures | recoveries "
            "| recovery p50 | recovery p99 | kill -9 / SIGTERM / restarts |",
            "|---|---|---|---|---|---|---|---|",
            f"| {s['sessions']} | {s['completed_identical']} | {s['no_route_allowed']} "
            f"| {s['failures']} ({fails}) | {s['recoveries']} | {s['recovery_p50_s']} s "
            f"| {s['recovery_p99_s']} s | {s['kills_9']} / {s['sigterms']} / {s['restarts']} |",
            "",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--servers", type=int, default=6, choices=range(2, 7))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--min-latency", type=float, default=20.0, help="one-way, ms")
    p.add_argument("--max-latency", type=float, default=50.0, help="one-way, ms")
    p.add_argument("--bandwidth", default=None, help="tc rate per node, e.g. 100mbit")
    p.add_argument("--min-gap", type=float, default=3.0, help="seconds between chaos events")
    p.add_argument("--max-gap", type=float, default=8.0)
    p.add_argument("--max-dead", type=int, default=3)
    p.add_argument("--settle", type=float, default=8.0, help="s after ONLINE a server counts")
    p.add_argument("--term-grace", type=float, default=20.0, help="s to exit after SIGTERM")
    p.add_argument("--deadline", type=float, default=120.0, help="s per generation")
    p.add_argument("--announce-period", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default: /tmp/churn-soak-<time>")
    p.add_argument("--append-to", default=None, help="append the markdown section to this file")
    args = p.parse_args(argv)
    args.workdir = args.workdir or f"/tmp/churn-soak-{int(time.time())}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = lab_unavailable_reason()
    if reason:
        print(f"churn soak: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    names = [
        "boot",
        *(f"s{i}" for i in range(args.servers)),
        *(f"c{i}" for i in range(args.clients)),
    ]
    lab = NetLab(names, latency_ms=args.min_latency, bandwidth=args.bandwidth, workdir=work / "lab")
    rng = random.Random(args.seed + 2)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            lab.set_latency(a, b, rng.uniform(args.min_latency, args.max_latency))
    with lab, HarnessGroup(work / "homes", announce_period=args.announce_period) as group:
        soak = Soak(args, lab, group)
        summary = soak.run()
        (work / "outcomes.json").write_text(
            json.dumps([asdict(o) for o in soak.outcomes], indent=1)
        )
        (work / "events.json").write_text(json.dumps(soak.events, indent=1))
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    section = markdown(args, summary)
    print(section)
    if args.append_to:
        with open(args.append_to, "a") as out:
            out.write("\n" + section)
    print(f"work folder (logs, outcomes.json, events.json): {work}")
    return 0 if summary["failures"] == 0 and not summary["incidents"] else 1


if __name__ == "__main__":
    sys.exit(main())

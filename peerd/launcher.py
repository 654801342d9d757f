"""Starting and stopping peerd daemons as child processes (the demo, tests and benchmarks).

A daemon prints its peer id, its addresses and a "Ready" line on stdout; `wait_ready` reads
them. Every process a `DaemonGroup` started is stopped when the group closes (SIGTERM, then
SIGKILL), whatever happened — and only those processes, by their PID.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT = 90.0
STOP_TIMEOUT = 8.0


class DaemonFailed(RuntimeError):
    """A daemon exited or stayed silent before it was ready; the message has its log's tail."""


@dataclass
class DaemonProcess:
    name: str
    proc: subprocess.Popen
    home: Path
    log_path: Path
    lines: queue.Queue = field(default_factory=queue.Queue)
    stdout: list[str] = field(default_factory=list)
    peer_id: str = ""
    addrs: list[str] = field(default_factory=list)
    relay_addrs: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def socket(self) -> Path:
        return self.home / "peerd.sock"

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> DaemonProcess:
        """Read stdout until the "Ready" line; collect the peer id and addresses printed."""
        deadline = time.monotonic() + timeout
        section = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonFailed(
                    f"{self.name} not ready after {timeout:.0f} s; log:\n{self.log_tail()}"
                )
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    raise DaemonFailed(
                        f"{self.name} exited with {self.proc.returncode} before it was ready; "
                        f"log:\n{self.log_tail()}"
                    ) from None
                continue
            if line is None:  # stdout closed
                continue
            self.stdout.append(line)
            text = line.strip()
            if text.startswith("Peer id:"):
                self.peer_id = text.split(":", 1)[1].strip()
            elif text.startswith("Listening on"):
                section = self.addrs
            elif text.startswith("Reachable through relays"):
                section = self.relay_addrs
            elif text.startswith("/") and section is not None:
                section.append(text)
            elif text.startswith("Ready"):
                return self
            else:
                section = None

    def wait_log(self, needle: str, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the daemon's log contains `needle` (e.g. "online: blocks")."""
        deadline = time.monotonic() + timeout
        while needle not in self.log_text():
            if self.proc.poll() is not None:
                raise DaemonFailed(
                    f"{self.name} exited with {self.proc.returncode}; log:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise DaemonFailed(
                    f"{self.name}: no {needle!r} after {timeout:.0f} s; log:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit status (negative: killed by a signal)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the swarm can tell."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class DaemonGroup:
    """Owns the daemons it starts; stops every one of them on exit."""

    def __init__(
        self,
        root: Path,
        *,
        announce_period: float = 2.0,
        threads: int | None = 1,
        cwd: Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.announce_period = announce_period
        self.threads = threads
        self.cwd = cwd
        self.daemons: list[DaemonProcess] = []

    def spawn(
        self,
        name: str,
        *args: str,
        command: str = "join",
        netns: str | None = None,
        host: str = "127.0.0.1",
        home: Path | None = None,
    ) -> DaemonProcess:
        """Start `peerd <command> ...` with its own home under the group's root."""
        home = home or self.root / name
        home.mkdir(parents=True, exist_ok=True)
        log_path = home / f"{name}-{len(self.daemons)}.log"
        cmd = [
            sys.executable,
            "-m",
            "cli.main",
            command,
            "--home",
            str(home),
            "--host",
            host,
            "--announce-period",
            str(self.announce_period),
            *args,
        ]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PEERD_INITIAL_PEERS", None)
        if self.threads is not None:  # many daemons on one small machine: don't oversubscribe
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=self.cwd or _package_root(),
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=env,
                text=True,
            )
        daemon = DaemonProcess(name=name, proc=proc, home=home, log_path=log_path)
        threading.Thread(target=_pump, args=(proc, daemon.lines), daemon=True).start()
        self.daemons.append(daemon)
        return daemon

    def start(self, name: str, *args: str, **kwargs) -> DaemonProcess:
        return self.spawn(name, *args, **kwargs).wait_ready()

    def start_servers(
        self, model_dir: Path, intervals: dict[str, str], bootstrap: DaemonProcess, *extra: str
    ) -> dict[str, DaemonProcess]:
        """`peerd serve` one daemon per {name: "A:B"} (started together), until each is online."""
        servers = {
            name: self.spawn(
                name,
                str(model_dir),
                "--blocks",
                blocks,
                "--initial-peers",
                bootstrap.addrs[0],
                "--rebalance-period",
                "0",
                *extra,
                command="serve",
            )
            for name, blocks in intervals.items()
        }
        for daemon in servers.values():
            daemon.wait_ready()
            daemon.wait_log("online: blocks")
        return servers

    def stop_all(self) -> None:
        for d in self.daemons:
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for d in self.daemons:
            try:
                d.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                d.kill()
            if d.proc.stdout:
                d.proc.stdout.close()

    def __enter__(self) -> DaemonGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def wait_until_listed(peer, servers: int, timeout: float = 60.0) -> None:
    """Wait until `peer` (a peerd.client.Peer) lists `servers` ONLINE servers of one model."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        models = peer.models()
        if any(
            sum(s["state"] == "ONLINE" for s in m["servers"]) >= servers for m in models.values()
        ):
            return
        time.sleep(0.5)
    raise DaemonFailed(f"fewer than {servers} servers listed ONLINE after {timeout:.0f} s")


def _package_root() -> Path:
    """The directory from which `python -m cli.main` finds the packages (checkout or site)."""
    import cli

    return Path(cli.__file__).resolve().parents[1]


def _pump(proc: subprocess.Popen, lines: queue.Queue) -> None:
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.put(line)
    except ValueError:  # closed while reading
        pass
    lines.put(None)

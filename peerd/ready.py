"""The ready file: how other processes learn that a daemon is up, and where to reach it.

A daemon writes `HOME/ready.json` once its node has joined the swarm and its local socket
listens, rewrites it when what it serves changes (loading → online), and removes it when it
stops. Writes are atomic (a temporary file renamed over the old one), so a reader never sees
half a file. Tests, the demo and benchmarks read this file; nothing parses a daemon's output.

    {"pid": 4242, "peer_id": "12D3KooW...", "addrs": ["/ip4/127.0.0.1/tcp/4001/p2p/12D3..."],
     "relay_addrs": [], "reachable": true, "socket": "/home/u/.peerd/peerd.sock",
     "http": null, "serving": {"model_id": "tiny@ab12", "start": 0, "end": 4, "state": "ONLINE"}}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

READY_FILE = "ready.json"


@dataclass
class ReadyInfo:
    pid: int
    peer_id: str
    addrs: list[str]
    socket: str
    relay_addrs: list[str] = field(default_factory=list)
    reachable: bool = True
    http: str | None = None  # "host:port" of the HTTP API, when one is served
    serving: dict[str, Any] | None = None  # {"model_id", "start", "end", "state"} of a server

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReadyInfo:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def ready_path(home: str | os.PathLike) -> Path:
    return Path(home).expanduser() / READY_FILE


def write_ready(home: str | os.PathLike, info: ReadyInfo) -> Path:
    path = ready_path(home)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(info), indent=1))
    os.replace(tmp, path)
    return path


def read_ready(home: str | os.PathLike) -> ReadyInfo | None:
    """The daemon's ready info, or None while there is none (not started yet, or stopped)."""
    try:
        return ReadyInfo.from_dict(json.loads(ready_path(home).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def remove_ready(home: str | os.PathLike, pid: int) -> None:
    """Remove the file if it is ours (a restarted daemon may already have written its own)."""
    info = read_ready(home)
    if info is not None and info.pid == pid:
        try:
            ready_path(home).unlink()
        except OSError:
            pass

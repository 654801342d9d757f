"""What a daemon fuzzing run found: counts per target and RPC type, failures, memory."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Report:
    frames: Counter = field(default_factory=Counter)  # per target
    per_type: Counter = field(default_factory=Counter)  # per (target, RPC type)
    refusals: Counter = field(default_factory=Counter)  # Error replies by code
    replies: int = 0
    hangs: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # closed when a reply was due, ...
    tcp_lingering: int = 0
    stream_open_failures: Counter = field(default_factory=Counter)
    good_steps: int = 0
    good_generations: int = 0
    good_mismatches: list[str] = field(default_factory=list)
    peak_rss: dict[str, int] = field(default_factory=dict)
    start_rss: dict[str, int] = field(default_factory=dict)
    peak_fds: dict[str, int] = field(default_factory=dict)
    crashes: dict[str, list[str]] = field(default_factory=dict)
    exited: dict[str, int | None] = field(default_factory=dict)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        mib = 2**20
        out = [f"frames sent: {sum(self.frames.values()):,} in {self.seconds:.0f} s"]
        out += [f"  {t}: {n:,}" for t, n in sorted(self.frames.items())]
        out.append("per RPC type:")
        out += [f"  {t}/{k}: {n:,}" for (t, k), n in sorted(self.per_type.items())]
        out.append(f"replies: {self.replies:,}; refusals by code: {dict(self.refusals)}")
        out.append(f"stream open failures: {dict(self.stream_open_failures)}")
        out.append(f"hangs: {len(self.hangs)} {self.hangs[:5]}")
        out.append(f"unexpected behaviour: {len(self.unexpected)} {self.unexpected[:8]}")
        out.append(f"raw TCP connections the daemon left open after our EOF: {self.tcp_lingering}")
        out.append(
            f"well-behaved: {self.good_steps} steps, {self.good_generations} generations, "
            f"{len(self.good_mismatches)} mismatches {self.good_mismatches[:3]}"
        )
        for name in self.peak_rss:
            out.append(
                f"{name}: RSS {self.start_rss[name] / mib:.0f} MiB at start, peak "
                f"{self.peak_rss[name] / mib:.0f} MiB; peak fds {self.peak_fds.get(name)}; "
                f"exit status {self.exited.get(name)}; crash lines {len(self.crashes[name])}"
            )
            out += [f"    {line[:200]}" for line in self.crashes[name][:6]]
        return out

    @property
    def ok(self) -> bool:
        return not (
            self.hangs
            or self.good_mismatches
            or any(self.crashes.values())
            or any(code is not None for code in self.exited.values())
        )

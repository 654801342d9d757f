"""Every swarm benchmark in one run on one machine: the engine and wire figures, the per-hop
figures, then the swarm's.

    python -m benchmarks.run_all [--quick] [--out benchmarks/results/run.json]
                                 [--max-load 3 --wait 900] [--model-cache DIR]

`--quick` is a smoke run (small model, few tokens, one run each). The full run uses the
reference setup of `benchmarks.common.REFERENCE` and takes about 18 minutes on a 2-core machine
(the in-process generation-engine and wire figures of `bench_generation` first, ~3 minutes).
Other work on the machine skews the figures: `--max-load` waits (up to `--wait` seconds) for the
1-minute load average to drop below it first, and the load before and after is reported.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks import bench_generation, bench_hop, bench_swarm
from benchmarks.common import REPO, limit_threads, model_dir_for, setup_for, write_json


def wait_for_quiet(max_load: float, wait: float) -> float:
    """Wait until the 1-minute load average is below `max_load` (at most `wait` s); return it."""
    deadline = time.monotonic() + wait
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        print(f"load average {os.getloadavg()[0]:.1f} >= {max_load}: waiting", flush=True)
        time.sleep(30)
    return os.getloadavg()[0]


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small model, few tokens, one run: a smoke run"
    )
    parser.add_argument("--out", type=Path, help="write every figure to this JSON file")
    parser.add_argument(
        "--model-cache", type=Path, help="keep the generated checkpoint here between runs"
    )
    parser.add_argument(
        "--only",
        default=",".join(bench_swarm.BENCHMARKS),
        help="subset of the swarm benchmarks (the hop benchmark always runs)",
    )
    parser.add_argument(
        "--max-load", type=float, default=None, help="wait for a 1-minute load average below this"
    )
    parser.add_argument(
        "--wait", type=float, default=900.0, help="longest wait for --max-load, seconds"
    )
    args = parser.parse_args(argv)
    setup = setup_for(args.quick)
    limit_threads(setup.threads)
    from peerd.logging import setup_logging

    setup_logging("WARNING")  # py-libp2p's routine errors stay quiet in this process too
    only = tuple(x for x in args.only.split(",") if x)
    began = time.monotonic()
    results: dict = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": commit(),
        "command": "python -m benchmarks.run_all" + (" --quick" if args.quick else ""),
        "cpus": os.cpu_count(),
    }
    if args.max_load is not None:
        results["load_at_start"] = wait_for_quiet(args.max_load, args.wait)
    with tempfile.TemporaryDirectory(prefix="peerd-bench-") as tmp:
        workdir = Path(tmp)
        results["generation"] = bench_generation.run(args.quick, workdir / "generation")
        print(bench_generation.report(results["generation"]), flush=True)
        model_dir = model_dir_for(setup, args.model_cache or workdir / "models")
        print(f"model: {model_dir}", flush=True)
        results["hop"] = bench_hop.run(setup, model_dir, workdir, 20 if args.quick else 200)
        print(bench_hop.report(results["hop"]), flush=True)
        results["swarm"] = bench_swarm.run(setup, model_dir, workdir, only)
    results["seconds"] = time.monotonic() - began
    print()
    print(
        f"{results['command']}  ({results['date']}, commit {results['commit']}, {results['cpus']} CPUs, "
        f"load {results['hop']['load_before'][0]:.1f} → {results['swarm']['load_after'][0]:.1f}, "
        f"{results['seconds']:.0f} s)"
    )
    print()
    print(bench_generation.report(results["generation"]))
    print()
    print(bench_hop.report(results["hop"]))
    print()
    print(bench_swarm.report(results["swarm"]))
    write_json(args.out, results)


if __name__ == "__main__":
    main()

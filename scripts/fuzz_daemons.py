"""Fuzz a real `peerd serve` process and a daemon's local socket (issue 9's proof, long run).

    python scripts/fuzz_daemons.py --frames 100000

Prints frames sent per target and per RPC type, refusals, crashes, hangs and peak RSS; exits
1 when a daemon crashed or hung or the well-behaved sessions saw different output.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz_daemons_run import Fuzz  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--identities", type=int, default=3, help="fuzzing peers (own keys)")
    parser.add_argument("--workers", type=int, default=9, help="concurrent peer streams")
    parser.add_argument(
        "--shares", default=None, help="frames per target, e.g. peer=0.5,local=0.47,tcp=0.03"
    )
    parser.add_argument("--root", type=Path, default=None, help="keep homes and logs here")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="peerd-fuzz-"))
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}: fuzzing with {args}; logs in {root}")
    shares = None
    if args.shares:
        shares = {k: float(v) for k, v in (p.split("=") for p in args.shares.split(","))}
    report = Fuzz(
        root, args.frames, args.seed, identities=args.identities, workers=args.workers,
        shares=shares,
    ).run()  # fmt: skip
    print("\n".join(report.lines()))
    print("OK" if report.ok else "FAILURES")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

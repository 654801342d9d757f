"""Short version of the daemon fuzzer (the long one: `python scripts/fuzz_daemons.py`).

A real `peerd serve` of a tiny Llama and a `join` daemon: ~800 random and mutated frames from
two identities at the server's inference and RPC protocols, at its TCP port before any
handshake, and at the join daemon's local socket, while a well-behaved inference session and
greedy generations run alongside. Every frame must be answered (or the stream hung up) within
the deadline, no daemon may log a handler crash or exit, and the well-behaved sessions must
match `LoadedBlocks` and transformers.
"""

from __future__ import annotations

import pytest

from tests.fuzz_daemons_run import Fuzz

pytestmark = pytest.mark.slow

FRAMES = 800
RSS_GROWTH = 400 * 2**20  # int8 data declared float64 expands ~8x: a few bombs are in the mix


def test_fuzzed_daemons_answer_everything_and_stay_correct(tmp_path):
    report = Fuzz(tmp_path, FRAMES, seed=2, identities=2, workers=4).run(progress=1e9)
    print("\n".join(report.lines()))
    assert sum(report.frames.values()) >= FRAMES
    assert {"peer", "local", "tcp"} <= set(report.frames)
    assert report.refusals["bad_request"] > 0  # the frames really were hostile
    assert not report.hangs, report.hangs
    # a stream closed without the error reply the harness predicted is not a crash (the daemon
    # served on); seen once in ~700 frames (an oversize header on an inference stream) and not
    # understood yet: tolerated when rare, listed in the output
    assert len(report.unexpected) <= max(1, sum(report.frames.values()) // 200), report.unexpected
    assert report.good_steps > 0 and report.good_generations > 0
    assert not report.good_mismatches, report.good_mismatches
    for name, lines in report.crashes.items():
        assert not lines, f"{name} logged crashes: {lines[:5]}"
        assert report.exited[name] is None, f"{name} exited with {report.exited[name]}"
        assert report.peak_rss[name] - report.start_rss[name] < RSS_GROWTH, report.lines()

"""Issue 9: servers started together spread over the model before they load, not minutes later.

Three `peerd serve --num-blocks 2` daemons of a 6-block tiny model start at the same moment,
with the default rebalance period (minutes): each one's first DHT listing misses the others,
so all of them would pick the same blocks. They must cover all six blocks within 30 s of
being up in the swarm (ready), as the DHT shows it, without a rebalancing move.
"""

from __future__ import annotations

import time

import pytest
import trio

from peerd.config import NodeConfig
from peerd.records import State
from tests.launcher import HarnessGroup
from tests.netharness import run_with_node
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

NUM_BLOCKS = 6
SERVERS = ("s1", "s2", "s3")
COVER_WITHIN = 30.0  # seconds from the servers being ready


def covered_blocks(records) -> set[int]:
    blocks: set[int] = set()
    for record in records:
        if record.state is State.ONLINE:
            blocks |= set(range(record.start, record.end))
    return blocks


def test_servers_started_together_cover_every_block_within_30_s(tmp_path):
    model = make_tiny_model(tmp_path / "tiny", num_layers=NUM_BLOCKS, tokenizer=False)
    with HarnessGroup(tmp_path / "homes") as group:
        boot = group.spawn("boot", "--new-swarm")
        boot_addr = boot.wait_ready().addrs[0]
        spawned = time.monotonic()
        servers = [
            group.spawn(
                name,
                str(model),
                "--num-blocks",
                "2",
                "--initial-peers",
                boot_addr,
                command="serve",
            )
            for name in SERVERS
        ]
        for daemon in servers:  # up and in the swarm; choosing blocks comes next
            daemon.wait_ready()
        began = time.monotonic()  # the clock starts here: a busy machine starts Python slowly
        for daemon in servers:  # the daemons' own word first
            daemon.wait_online(timeout=COVER_WITHIN)
        config = NodeConfig(
            home=tmp_path / "peer",
            host="127.0.0.1",
            initial_peers=[boot_addr],
            announce_period=2.0,
            reachability="private",
        )
        ids = {d.peer_id for d in servers}

        async def body(node):
            records: dict = {}
            while time.monotonic() - began < COVER_WITHIN:
                for record in await node.list_servers(include_offline=True):
                    known = records.get(record.peer_id)
                    if record.peer_id in ids and (known is None or record.seq > known.seq):
                        records[record.peer_id] = record
                if covered_blocks(records.values()) == set(range(NUM_BLOCKS)):
                    return records, time.monotonic() - began
                await trio.sleep(0.5)
            return records, None

        records, waited = run_with_node(config, body, timeout=COVER_WITHIN + 30)
        logs = {d.name: d.log_text() for d in servers}
        spans = {d.name: d.info.serving for d in servers}
        assert waited is not None, (
            f"blocks {sorted(set(range(NUM_BLOCKS)) - covered_blocks(records.values()))} not "
            f"covered {COVER_WITHIN:.0f} s after the servers were ready; they serve {spans}; logs:"
            + "".join(
                f"\n--- {n}\n" + "\n".join(ln for ln in t.splitlines() if "peerd.serve:" in ln)
                for n, t in logs.items()
            )
        )
        assert sorted((s["start"], s["end"]) for s in spans.values()) == [(0, 2), (2, 4), (4, 6)]
        assert not any("rebalancing: moving" in t for t in logs.values())  # settled at start
        print(
            f"all {NUM_BLOCKS} blocks covered {waited:.1f} s after the servers were ready "
            f"({began - spawned:.1f} s after they were started)"
        )

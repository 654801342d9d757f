"""Probe (not a test): int8 data declared float64 at a real server, peak RSS measured.

python -m tests.fuzz_probe_bomb [COUNT]
"""

from __future__ import annotations

import struct
import sys
import tempfile
import time
from pathlib import Path

import psutil
import trio

import wire
from peerd.config import NodeConfig
from peerd.framed import FramedChannel, Libp2pByteStream
from peerd.server.block_server import RPC_PROTOCOL
from tests.fuzz_frames import frame_of, pack
from tests.launcher import HarnessGroup
from tests.netharness import run_with_node
from tests.tiny_models import make_tiny_model

TOKENS = 917_504  # x 64 = 58.7 MB of int8 codes + 3.7 MB of scales: under the 64 MiB cap


def bomb_frame(model_id: str) -> bytes:
    numel = TOKENS * 64
    hidden = {
        "dtype": "float64", "shape": [1, TOKENS, 64], "compression": "int8",
        "data": bytes(numel), "scales": struct.pack("<f", 0.01) * (numel // 64), "block": 64,
    }  # fmt: skip
    msg = {"v": 1, "type": "forward", "model_id": model_id, "start": 0, "end": 2,
           "hidden": hidden, "compression": "int8"}  # fmt: skip
    return frame_of(pack(msg))


def main(count: int) -> None:
    from blocks import checkpoint_fingerprint

    root = Path(tempfile.mkdtemp(prefix="peerd-bomb-"))
    model = make_tiny_model(root / "tiny", "llama", num_layers=2)
    model_id = f"tiny@{checkpoint_fingerprint(model)}"
    frame = bomb_frame(model_id)
    print(f"frame {len(frame) / 2**20:.1f} MiB, decodes to {TOKENS * 64 * 8 / 2**20:.0f} MiB")
    with HarnessGroup(root / "homes") as group:
        server = group.spawn("server", str(model), "--blocks", "0:2", "--new-swarm",
                             "--rebalance-period", "0", command="serve")  # fmt: skip
        server.wait_ready().wait_online()
        proc = psutil.Process(server.pid)
        base = proc.memory_info().rss
        peak = [base]

        async def body(node):
            async def sample():
                while True:
                    peak[0] = max(peak[0], proc.memory_info().rss)
                    await trio.sleep(0.02)

            async def one(i, replies):
                stream = await node.open_stream(server.peer_id, RPC_PROTOCOL)
                channel = FramedChannel(Libp2pByteStream(stream), wire.DEFAULT_MAX_FRAME)
                await channel.stream.send_all(frame)
                replies.append(wire.parse_message(await channel.read_message()))

            replies = []
            async with trio.open_nursery() as n:
                n.start_soon(sample)
                async with trio.open_nursery() as m:
                    for i in range(count):
                        m.start_soon(one, i, replies)
                await trio.sleep(1)
                n.cancel_scope.cancel()
            return replies

        config = NodeConfig(home=root / "peer", host="127.0.0.1",
                            initial_peers=[server.addrs[0]], reachability="private")  # fmt: skip
        began = time.monotonic()
        replies = run_with_node(config, body, timeout=300)
        print(f"{count} bombs in {time.monotonic() - began:.0f} s; replies "
              f"{[(getattr(r, 'code', type(r).__name__), getattr(r, 'message', '')[:80]) for r in replies]}")  # fmt: skip
        print(
            f"server RSS {base / 2**20:.0f} MiB before, peak {peak[0] / 2**20:.0f} MiB; "
            f"alive {server.proc.poll() is None}"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)

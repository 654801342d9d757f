"""balancing: which contiguous interval of blocks a server holds, and when it should move.

Pure functions over plain records (no I/O, no clock, no randomness); see README.md beside this
file for the algorithm.
"""

from balancing.choose import ClaimCheck, canonical_plan, choose_blocks, join_place, settle
from balancing.move import (
    DEFAULT_MAX_DEFERRALS,
    DEFAULT_MIN_GAIN,
    first_mover,
    should_move,
    waits_for,
)
from balancing.swarm import Placement, SwarmEntry, block_throughputs, swarm_throughput

__all__ = [
    "ClaimCheck",
    "DEFAULT_MAX_DEFERRALS",
    "DEFAULT_MIN_GAIN",
    "Placement",
    "SwarmEntry",
    "block_throughputs",
    "canonical_plan",
    "choose_blocks",
    "first_mover",
    "join_place",
    "settle",
    "should_move",
    "swarm_throughput",
    "waits_for",
]

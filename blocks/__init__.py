"""Transformer blocks in plain torch that load HF-format checkpoints.

A server loads a `LoadedBlocks` of blocks and runs `forward`, `step` (with a `KVCache`) and `backward`;
a client loads `ClientParts` (embeddings, final norm, LM head). See DESIGN.md.
"""

from .cache import KVCache, cache_bytes_per_token
from .client import ClientParts
from .config import ModelConfig, load_config
from .errors import (
    BlockRangeError,
    BlocksError,
    CheckpointError,
    InputError,
    MissingTensor,
    UnsupportedArchitecture,
)
from .fingerprint import checkpoint_fingerprint
from .span import LoadedBlocks
from .throughput import measure_throughput

__all__ = [
    "BlockRangeError",
    "BlocksError",
    "CheckpointError",
    "ClientParts",
    "InputError",
    "KVCache",
    "MissingTensor",
    "ModelConfig",
    "LoadedBlocks",
    "UnsupportedArchitecture",
    "cache_bytes_per_token",
    "checkpoint_fingerprint",
    "load_config",
    "measure_throughput",
]

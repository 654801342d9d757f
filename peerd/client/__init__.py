"""The light client library: imports only the standard library, msgpack and `wire` (whose
torch import waits until a tensor is encoded), so any script can talk to its daemon.

    from peerd.client import Peer
    print(Peer().generate("/models/llama-2-7b", "The capital of France is", max_new_tokens=8))

Torch-based helpers load on first use: `RemoteBlocks` (an autograd-aware module over the
chain) and `AutoDistributedModelForCausalLM` (transformers-style generate).
"""

from peerd.client.connection import Connection, PeerdError, default_socket_path
from peerd.client.peer import ChainSession, Peer

__all__ = [
    "AutoDistributedModelForCausalLM",
    "ChainSession",
    "Connection",
    "Peer",
    "PeerdError",
    "RemoteBlocks",
    "default_socket_path",
]


def __getattr__(name: str):
    if name in ("RemoteBlocks", "AutoDistributedModelForCausalLM"):
        from peerd.client import torch_model

        return getattr(torch_model, name)
    raise AttributeError(name)

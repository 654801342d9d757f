"""The light client library: imports only the standard library, msgpack and `wire` (whose
torch import waits until a tensor is encoded), so any script can talk to its daemon.

    from peerd.client import DaemonClient
    print(DaemonClient().generate("/models/llama-2-7b", "The capital of France is", max_new_tokens=8))

Torch-based helpers load on first use: `RemoteBlocks` (an autograd-aware module over the
chain) and `AutoDistributedModelForCausalLM` (transformers-style generate).
"""

from peerd.client.connection import Connection, PeerdError, default_socket_path
from peerd.client.daemon_client import ChainSession, DaemonClient

Peer = DaemonClient  # the name before 0.2 (it is a handle on the local daemon, not a swarm peer)

__all__ = [
    "AutoDistributedModelForCausalLM",
    "ChainSession",
    "Connection",
    "DaemonClient",
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

"""Model shapes and the hardware/network figures the simulator assumes (all stated here).

Compute: a transformer block of hidden size h has about 12 h^2 weights. Processing `n` new
tokens with `c` tokens already in the KV cache costs, per block,

    overhead + max(weight bytes / memory bandwidth,  (2 * 12 h^2 * n + 4 h * n * (c + n)) / FLOP/s)

i.e. one decoding step is bound by reading the weights, a long prefill by arithmetic. Network:
a message of `b` bytes from peer x to peer y takes rtt(x, y) / 2 + b / bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The part of a model's shape that sets its cost."""

    name: str
    num_blocks: int
    hidden: int
    bytes_per_weight: float  # as served: 2 for fp16/bf16, 1 for int8

    @property
    def weights_per_block(self) -> float:
        return 12.0 * self.hidden**2


# BLOOM-7.1B served in fp16; BLOOM-176B in int8 (LLM.int8), as the Petals papers serve them.
BLOOM_7B = ModelShape("bloom-7b1", num_blocks=30, hidden=4096, bytes_per_weight=2.0)
BLOOM_176B = ModelShape("bloom-176b", num_blocks=70, hidden=14336, bytes_per_weight=1.0)
SHAPES = {shape.name: shape for shape in (BLOOM_7B, BLOOM_176B)}


@dataclass(frozen=True)
class Hardware:
    """An A100-class server GPU and an ordinary Internet link."""

    memory_bandwidth: float = 1.5e12  # bytes/s actually reached when streaming weights
    flops: float = 100e12  # FLOP/s actually reached in fp16 matmuls
    block_overhead_s: float = 0.5e-3  # kernel launches and framework time, per block per request
    activation_bytes: int = 2  # fp16 hidden states on the wire (no compression)

    def block_time(self, shape: ModelShape, new_tokens: int, cached_tokens: int) -> float:
        """Seconds for one block to process `new_tokens` after `cached_tokens`."""
        weights = shape.weights_per_block * shape.bytes_per_weight / self.memory_bandwidth
        matmuls = 2.0 * shape.weights_per_block * new_tokens
        attention = 4.0 * shape.hidden * new_tokens * (cached_tokens + new_tokens)
        return self.block_overhead_s + max(weights, (matmuls + attention) / self.flops)

    def token_bytes(self, shape: ModelShape) -> int:
        """Bytes of one token's hidden state on the wire."""
        return shape.hidden * self.activation_bytes

"""ServeOptions: what `peerd serve` serves and how, importable without torch or trio.

Lives apart from `service.py` (which re-exports it) so that the command line can build its
options from these fields at start without loading the serving machinery. Fields with `help`
metadata are options of `peerd serve` (see cli/options.py for the metadata keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from peerd.server.limits import ServerLimits

DTYPES = ("float32", "bfloat16", "float16")
QUANTS = ("none", "int8", "nf4")


def parse_blocks(text: str) -> tuple[int, int]:
    """`A:B` → (A, B), the blocks A..B-1; a ValueError says what is wrong."""
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError("expected A:B, e.g. 0:8 for blocks 0..7") from None
    if not 0 <= start < end:
        raise ValueError(f"{text}: need 0 <= A < B")
    return start, end


def _default_min_gain() -> float:
    from balancing import DEFAULT_MIN_GAIN  # balancing loads numpy: not at CLI start

    return DEFAULT_MIN_GAIN


@dataclass
class ServeOptions:
    """What to serve and how; every field has the default a consumer-GPU owner would expect.

    `device` and `dtype` left as None are settled in `__post_init__` (never None afterwards):
    the device is cuda:GPU when `gpu` is given, else cpu; the dtype float32 on CPU, bfloat16
    elsewhere.
    """

    model_path: Path
    model_name: str | None = field(
        default=None, metadata={"help": "Name in the model id (default: the directory's name)."}
    )
    # Explicit blocks pin the server: it never rebalances.
    blocks: tuple[int, int] | None = field(
        default=None,
        metadata={"help": "Serve exactly blocks A..B-1.", "metavar": "A:B", "parse": parse_blocks},
    )
    num_blocks: int | None = field(
        default=None,
        metadata={"help": "Serve this many blocks, where the swarm needs them.", "min": 1},
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Compute dtype (default: float32 on CPU, bfloat16 on GPU).",
            "choices": DTYPES,
        },
    )
    quant: str = field(
        default="none",
        metadata={"help": "Weight quantization (bitsandbytes LLM.int8 or NF4).", "choices": QUANTS},
    )
    gpu: int | None = field(
        default=None, metadata={"help": "CUDA device index to serve on.", "min": 0}
    )
    device: str | None = field(
        default=None, metadata={"help": "torch device (e.g. cpu, cuda:1); --gpu N is cuda:N."}
    )
    limits: ServerLimits = field(default_factory=ServerLimits)
    rebalance_period: float = field(
        default=300.0,
        metadata={
            "help": "Seconds between checks whether other blocks need us more (0: never).",
            "min": 0,
        },
    )
    min_gain: float = field(default_factory=_default_min_gain)

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = f"cuda:{self.gpu}" if self.gpu is not None else "cpu"
        if self.dtype is None:
            self.dtype = "float32" if self.device == "cpu" else "bfloat16"

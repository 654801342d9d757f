"""Measured speed of a span on its device, cached as JSON so a server measures once.

Figures are measured on one block and stored per block, keyed by (model, device, dtype, quant):
a server that later holds a different number of blocks of the same model reuses them. The span
figures returned divide the block figures by the number of blocks (blocks run one after the
other). Routing uses these to estimate how long a step through a server takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from .span import LoadedBlocks

VERSION = 1
PREFILL = 64  # tokens cached before timing inference steps
FORWARD_TOKENS = 128  # sequence length of the timed forward passes
BUDGET_S = 0.5  # rough time spent on each of the two measurements


def device_name(device: torch.device) -> str:
    """A stable description of the hardware the figures hold for."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine() or "unknown"  # /proc is Linux-only
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{device.type}:{model}:{torch.get_num_threads()} threads"


def measure_throughput(
    span: LoadedBlocks, cache_dir: str | Path, model_key: str, *, force: bool = False
) -> dict:
    """{"inference_steps_per_s", "forward_tokens_per_s"} of the whole span, plus per-block figures
    and the key they were cached under. Measured (about a second) only if not cached or `force`."""
    key = {
        "version": VERSION,
        "model": model_key,
        "device": device_name(span.device),
        "dtype": str(span.dtype).removeprefix("torch."),
        "quant": span.quant,
    }
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=12).hexdigest()
    file = Path(cache_dir) / f"throughput-{digest}.json"
    record = None
    if not force and file.exists():
        try:
            record = json.loads(file.read_text())
            if record.get("key") != key:
                record = None
        except (OSError, ValueError):
            record = None
    cached = record is not None
    if record is None:
        record = {"key": key, **_measure_block(span), "measured_at": time.time()}
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, file)
    n = span.end - span.start
    return {
        "inference_steps_per_s": record["block_inference_steps_per_s"] / n,
        "forward_tokens_per_s": record["block_forward_tokens_per_s"] / n,
        "num_blocks": n,
        "cached": cached,
        **record,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _measure_block(span: LoadedBlocks) -> dict:
    start, end = span.start, span.start + 1
    h, dtype, device = span.config.hidden_size, span.dtype, span.device
    gen = torch.Generator().manual_seed(0)

    def rand(t: int) -> torch.Tensor:
        return torch.randn(1, t, h, generator=gen).to(dtype=dtype, device=device)

    # Inference: one new token per step against a cache already holding PREFILL tokens.
    max_steps = 200
    cache = span.new_cache(1, PREFILL + max_steps + 2, start, end)
    span.step(rand(PREFILL), cache)
    token = rand(1)
    span.step(token, cache)  # warm-up
    times = []
    while len(times) < max_steps and (len(times) < 5 or sum(times) < BUDGET_S):
        times.append(_timed(lambda: span.step(token, cache), device))
    step_s = statistics.median(times)

    # Forward: whole sequences, as in prefill and training.
    x = rand(FORWARD_TOKENS)
    span.forward(x, start=start, end=end)  # warm-up
    times = []
    while len(times) < 50 and (len(times) < 3 or sum(times) < BUDGET_S):
        times.append(_timed(lambda: span.forward(x, start=start, end=end), device))
    forward_s = statistics.median(times)
    return {
        "block_inference_steps_per_s": 1.0 / step_s,
        "block_forward_tokens_per_s": FORWARD_TOKENS / forward_s,
    }

"""Wire codec speed and activation-compression accuracy on a (1, 128, 4096) float32 tensor.

Round trip = everything the two daemons do for one hidden-state message: build a StepResult,
to_wire, encode_frame (msgpack), parse_header, decode_payload, parse_message (validation and
tensor decoding). Its MB/s (of float32 tensor bytes) is compared with a plain
`bytes(t.numpy())` copy measured in the same run. Sizes are whole frames per element; errors
are ||x - decoded|| / ||x|| on Gaussian data and on data with 6 outlier channels (x50).
bitsandbytes' blockwise quantizer is timed alongside for reference when it is installed.

    python benchmarks/bench_wire.py [--repeats 30] [--threads N]

On a busy 2-core machine torch's 2-thread kernels stall whenever a core is taken;
`--threads 1` gives steadier figures there.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import wire

SHAPE = (1, 128, 4096)
OUTLIER_CHANNELS = [7, 100, 1000, 2000, 3000, 4000]


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time of `fn` over `repeats` runs after a warm-up (noisy shared machine)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def round_trip(x: torch.Tensor, compression: str) -> torch.Tensor:
    frame = wire.encode_frame(wire.StepResult(x, 0, 0, compression=compression).to_wire())
    view = memoryview(frame)
    n = wire.parse_header(view[: wire.HEADER_SIZE], wire.DEFAULT_MAX_FRAME)
    return wire.parse_message(
        wire.decode_payload(view[wire.HEADER_SIZE : wire.HEADER_SIZE + n])
    ).hidden


def relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.float() - y.float()).norm() / x.float().norm())


def data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    gaussian = torch.randn(SHAPE)
    outliers = gaussian.clone()
    outliers[..., OUTLIER_CHANNELS] *= 50
    return gaussian, outliers


def bench_codec(repeats: int) -> None:
    gaussian, outliers = data()
    mbytes = gaussian.numel() * 4 / 1e6
    copy_ms = best_ms(lambda: bytes(gaussian.numpy()), repeats)
    print(f"baseline bytes(t.numpy()) copy: {copy_ms:.3f} ms = {mbytes / copy_ms * 1e3:,.0f} MB/s")
    print()
    print(
        "| compression | encode ms | decode ms | round trip MB/s | vs copy | bytes/elem "
        "| rel. error (gaussian) | rel. error (outliers) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for compression in wire.COMPRESSIONS:
        message = wire.StepResult(gaussian, 0, 0, compression=compression)
        frame = wire.encode_frame(message.to_wire())
        payload = memoryview(frame)[wire.HEADER_SIZE :]
        encode_ms = best_ms(lambda m=message: wire.encode_frame(m.to_wire()), repeats)
        decode_ms = best_ms(lambda p=payload: wire.parse_message(wire.decode_payload(p)), repeats)
        total_ms = best_ms(lambda c=compression: round_trip(gaussian, c), repeats)
        rate = mbytes / total_ms * 1e3
        print(
            f"| {compression} | {encode_ms:.3f} | {decode_ms:.3f} | {rate:,.0f} "
            f"| {copy_ms / total_ms:.3f} | {len(frame) / gaussian.numel():.4f} "
            f"| {relative_error(gaussian, round_trip(gaussian, compression)):.5f} "
            f"| {relative_error(outliers, round_trip(outliers, compression)):.5f} |"
        )


def bench_small_step(repeats: int) -> None:
    """Per-token decoding sends (1, 1, hidden) states: here fixed costs dominate, not bytes."""
    x = torch.randn(1, 1, SHAPE[-1])
    ping_us = (
        best_ms(
            lambda: wire.parse_message(
                wire.decode_payload(wire.encode_frame(wire.Ping(1).to_wire())[wire.HEADER_SIZE :])
            ),
            repeats * 10,
        )
        * 1e3
    )
    step_us = best_ms(lambda: round_trip(x, "none"), repeats * 10) * 1e3
    print(
        f"\nsmall messages, full round trip: Ping {ping_us:.0f} us; "
        f"Step of (1, 1, {SHAPE[-1]}) float32 {step_us:.0f} us"
    )


def bench_bitsandbytes(repeats: int) -> None:
    try:
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes.functional as bnbf
    except Exception as exc:  # noqa: BLE001 - optional reference only
        print(f"\n(bitsandbytes unavailable: {exc!r})")
        return
    gaussian, outliers = data()
    print("\nreference: bitsandbytes quantize_blockwise vs wire int8 (block 64), same data")
    print(
        "| method | quantize ms | dequantize ms | rel. error (gaussian) | rel. error (outliers) |"
    )
    print("|---|---|---|---|---|")
    for block in (64, 4096):

        def bnb(x: torch.Tensor, b: int = block) -> torch.Tensor:
            q, state = bnbf.quantize_blockwise(x, blocksize=b)
            return bnbf.dequantize_blockwise(q, state)

        q, state = bnbf.quantize_blockwise(gaussian, blocksize=block)
        print(
            f"| bnb blockwise {block} | {best_ms(lambda b=block: bnbf.quantize_blockwise(gaussian, blocksize=b), repeats):.3f} "
            f"| {best_ms(lambda q=q, s=state: bnbf.dequantize_blockwise(q, s), repeats):.3f} "
            f"| {relative_error(gaussian, bnb(gaussian)):.5f} | {relative_error(outliers, bnb(outliers)):.5f} |"
        )
    from wire.compression import dequantize_int8, quantize_int8

    codes, scales = quantize_int8(gaussian)
    n = gaussian.numel()

    def ours(x: torch.Tensor) -> torch.Tensor:
        c, s = quantize_int8(x)
        return dequantize_int8(c, s, n, torch.float32, wire.INT8_BLOCK).view(SHAPE)

    print(
        f"| wire int8 block 64 | {best_ms(lambda: quantize_int8(gaussian), repeats):.3f} "
        f"| {best_ms(lambda: dequantize_int8(codes, scales, n, torch.float32, 64), repeats):.3f} "
        f"| {relative_error(gaussian, ours(gaussian)):.5f} | {relative_error(outliers, ours(outliers)):.5f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"tensor {SHAPE} float32, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    bench_codec(args.repeats)
    bench_small_step(args.repeats)
    bench_bitsandbytes(args.repeats)


if __name__ == "__main__":
    main()

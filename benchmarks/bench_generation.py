"""The generation engine and activations on the wire: what the engine and the dtype change costs.

Three measurements, each against a baseline timed in the same run (the two take turns; best
of the runs, medians kept too), on small random models written here (`write_tiny_llama`) and
the byte-level BPE tokenizer.json it trains. Times are CPU seconds of this process on one
torch thread, so other work on a shared machine adds less noise than to wall time:

1. detokenization: `Detokenizer` (tokenizers' DecodeStream, O(1) per token) vs what the
   daemon did before the engine, decoding all new ids again after every token and holding
   back text that ends in U+FFFD; for 256, 1024 and 4096 tokens of text (the tokenizer's own
   corpus with some non-ASCII sentences, so characters span tokens). Both outputs are checked
   against one full decode.
2. engine overhead: greedy generation through `Generation` over a `LocalStep` vs a bare loop
   doing embed → `LoadedBlocks.step` → head → argmax by hand (same tokens asserted), also
   with a tokenizer (streamed text); the engine's own time (all but the step) is measured
   too, as the ratio alone drowns in run-to-run noise; and beam search (num_beams=4) per
   token vs greedy, for information.
3. wire: encoded size and encode+decode time of one `wire.Step` frame with (1, T, 4096)
   hidden states in float32, bfloat16, float16 (and float32 with float16/int8 compression),
   against float32; and how `wire.rows_per_frame` cuts a 4096-token × 8192-hidden prefill.

    python -m benchmarks.bench_generation [--quick] [--threads 1] [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.activations import (
    HIDDEN,
    PREFILL,
    bench_cuts,
    bench_wire_step,
)
from benchmarks.common import (
    best_and_median,
    interleaved,
    limit_threads,
    load_average,
    table,
    write_json,
)
from blocks import ClientParts, LoadedBlocks
from peerd.demo.tiny import CORPUS, TinyLlama, write_tiny_llama
from peerd.generation import Generation, GenerationParams, LocalStep, generate_sync
from peerd.generation.detokenize import Detokenizer

NON_ASCII = [
    "Grüße aus Köln: café, naïve, jalapeño.",
    "東京とピア: 分散推論 🙂🚀",
]
TINY = TinyLlama()  # vocab 512, hidden 64, 8 layers: the engine's share is largest here
SMALL = TinyLlama(
    vocab_size=32000, hidden_size=256, intermediate_size=704, num_layers=8, num_heads=8
)


# ----- 1. detokenization --------------------------------------------------------------------


def text_tokens(tokenizer, count: int) -> list[int]:
    """`count` ids of running text: the corpus and the non-ASCII lines, repeated."""
    line = " ".join(CORPUS[:3] + NON_ASCII[:1] + CORPUS[3:] + NON_ASCII[1:]) + "\n"
    ids: list[int] = []
    while len(ids) < count:
        ids += tokenizer.encode(line).ids
    return ids[:count]


def decode_again(tokenizer, ids: list[int]) -> str:
    """The old way: after every token decode all new ids again; emit what was added."""
    pieces, text, new = [], "", []
    for token in ids:
        new.append(token)
        full = tokenizer.decode(new)
        if not full.endswith("\ufffd"):  # hold back a character still being spelled
            pieces.append(full[len(text) :])
            text = full
    pieces.append(tokenizer.decode(new)[len(text) :])
    return "".join(pieces)


def stream(tokenizer, ids: list[int], context: list[int]) -> str:
    detok = Detokenizer(tokenizer, context)
    pieces = [detok.push(token) for token in ids]
    pieces.append(detok.flush())
    return "".join(pieces)


def bench_detokenize(tokenizer, lengths: tuple[int, ...], runs: int) -> list[dict]:
    context = tokenizer.encode("Hello world!").ids
    out = []
    for n in lengths:
        ids = text_tokens(tokenizer, n)
        whole = tokenizer.decode(ids)
        assert stream(tokenizer, ids, context) == whole, "stream pieces != full decode"
        assert decode_again(tokenizer, ids) == whole, "old pieces != full decode"
        times = interleaved(
            {
                "again": lambda ids=ids: decode_again(tokenizer, ids),
                "stream": lambda ids=ids: stream(tokenizer, ids, context),
            },
            runs if n < 4096 else max(1, runs // 2),
        )
        again, again_med = best_and_median(times["again"])
        streamed, stream_med = best_and_median(times["stream"])
        out.append(
            {
                "tokens": n,
                "chars": len(whole),
                "decode_again_s": again,
                "stream_s": streamed,
                "speedup": again / streamed,
                "speedup_median": again_med / stream_med,
                "pieces_equal_full_decode": True,
            }
        )
    return out


# ----- 2. engine overhead -------------------------------------------------------------------


class Model:
    def __init__(self, path: Path) -> None:
        self.parts = ClientParts.load(path)
        self.span = LoadedBlocks.load(path, 0, self.parts.config.num_blocks)
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.vocab = self.parts.config.vocab_size
        self.own: dict[tuple[int, bool], list[float]] = {}  # (beams, text) -> engine's own s

    @torch.no_grad()
    def bare(self, prompt: list[int], n: int) -> list[int]:
        """Greedy by hand: embed → blocks → head → argmax, one token per step."""
        parts, span = self.parts, self.span
        cache = span.new_cache(1, len(prompt) + n)
        ids, past, out = torch.tensor([prompt]), 0, []
        for _ in range(n):
            hidden = span.step(parts.embed(ids, past).to(span.dtype), cache)
            token = int(parts.logits(hidden[:, -1:].to(parts.dtype))[:, -1].argmax(dim=-1))
            out.append(token)
            past += ids.shape[1]
            ids = torch.tensor([[token]])
        return out

    @torch.no_grad()
    def engine(self, prompt: list[int], n: int, *, beams: int = 1, text: bool = False) -> list:
        """Through the engine; the seconds spent outside `LocalStep` go to `self.own[...]`."""
        params = GenerationParams(max_new_tokens=n, eos_token_id=(), num_beams=beams)
        tokenizer = self.tokenizer if text else None
        t0 = time.process_time()
        gen = Generation([prompt], params, tokenizer=tokenizer, vocab_size=self.vocab)
        step = TimedStep(LocalStep(self.parts, self.span, gen.max_length))
        ids = generate_sync(gen, step)[0].token_ids
        self.own.setdefault((beams, text), []).append(time.process_time() - t0 - step.seconds)
        return ids


class TimedStep:
    """A step that counts the CPU seconds spent in it (embedding, blocks, head)."""

    def __init__(self, step: LocalStep) -> None:
        self.step, self.seconds = step, 0.0

    def __call__(self, request) -> torch.Tensor:
        t0 = time.process_time()
        out = self.step(request)
        self.seconds += time.process_time() - t0
        return out


def bench_engine(shape: TinyLlama, path: Path, new_tokens: int, runs: int) -> dict:
    model = Model(path)
    prompt = text_tokens(model.tokenizer, 8)
    reference = model.bare(prompt, new_tokens)
    assert model.engine(prompt, new_tokens) == reference, "engine and bare loop differ"
    assert model.engine(prompt, new_tokens, text=True) == reference
    model.engine(prompt, new_tokens, beams=4)  # warm-up
    model.own.clear()
    times = interleaved(
        {
            "bare": lambda: model.bare(prompt, new_tokens),
            "engine": lambda: model.engine(prompt, new_tokens),
            "engine_text": lambda: model.engine(prompt, new_tokens, text=True),
            "beam4": lambda: model.engine(prompt, new_tokens, beams=4, text=True),
        },
        runs,
    )
    best = {k: min(v) / new_tokens for k, v in times.items()}
    med = {k: statistics.median(v) / new_tokens for k, v in times.items()}
    own = {k: statistics.median(v) / new_tokens for k, v in model.own.items()}
    return {
        "model": {
            "vocab": shape.vocab_size,
            "hidden": shape.hidden_size,
            "layers": shape.num_layers,
        },
        "new_tokens": new_tokens,
        "runs": runs,
        "same_tokens": True,
        "ms_per_token": {k: v * 1e3 for k, v in best.items()},
        "ms_per_token_median": {k: v * 1e3 for k, v in med.items()},
        "engine_vs_bare": best["engine"] / best["bare"],
        "engine_text_vs_bare": best["engine_text"] / best["bare"],
        "engine_vs_bare_median": med["engine"] / med["bare"],
        "engine_text_vs_bare_median": med["engine_text"] / med["bare"],
        "engine_own_us_per_token": own[(1, False)] * 1e6,
        "engine_text_own_us_per_token": own[(1, True)] * 1e6,
        "beam4_own_us_per_token": own[(4, True)] * 1e6,
        "engine_own_vs_bare": own[(1, False)] / med["bare"],
        "engine_text_own_vs_bare": own[(1, True)] / med["bare"],
        "beam4_vs_greedy": best["beam4"] / best["engine_text"],
        "beam4_vs_greedy_median": med["beam4"] / med["engine_text"],
    }


# ----- 3. the wire --------------------------------------------------------------------------


def run(quick: bool, workdir: Path) -> dict:
    """Every measurement; `quick` shrinks lengths and runs to a ~30 s smoke run."""
    began = time.monotonic()
    results: dict = {"load_before": load_average(), "quick": quick}
    tiny_dir = write_tiny_llama(workdir / "tiny", TINY)
    lengths = (256, 1024) if quick else (256, 1024, 4096)
    tokenizer = Model(tiny_dir).tokenizer
    results["detokenize"] = bench_detokenize(tokenizer, lengths, 3 if quick else 7)
    if quick:
        engines = [(TINY, tiny_dir, 128, 3)]
    else:
        small_dir = write_tiny_llama(workdir / "small", SMALL)
        engines = [(TINY, tiny_dir, 256, 9), (SMALL, small_dir, 128, 7)]
    results["engine"] = [bench_engine(*e) for e in engines]
    results["wire"] = [row for t in (1, 128) for row in bench_wire_step(t, 5 if quick else 25)]
    results["cuts"] = bench_cuts()
    results["load_after"] = load_average()
    results["seconds"] = time.monotonic() - began
    return results


def _rows(items: list[dict], *cells: str | Callable[[dict], object]) -> list[list[object]]:
    """One table row per item: each cell a key of it, or a function of it."""
    return [[c(i) if callable(c) else i[c] for c in cells] for i in items]


def report(r: dict) -> str:
    def model(e: dict) -> str:
        return "v{vocab} h{hidden} l{layers}".format(**e["model"])

    def ms(key: str) -> Callable[[dict], float]:
        return lambda e: e["ms_per_token"][key]

    def commas(key: str) -> Callable[[dict], str]:
        return lambda d: f"{d[key]:,}"

    detok = table(
        "Detokenization, CPU ms per output (best run): all ids decoded again vs the stream",
        ["tokens", "chars", "again ms", "stream ms", "again ÷ stream", "(median)"],
        _rows(
            r["detokenize"],
            *("tokens", "chars", lambda d: d["decode_again_s"] * 1e3),
            *(lambda d: d["stream_s"] * 1e3, "speedup", "speedup_median"),
        ),
    )
    engine = table(
        "Greedy, CPU ms per token (best run): engine over LocalStep vs the bare loop; "
        "own = the engine's time outside the step (median)",
        ["model", "tokens", "bare", "engine", "÷ bare", "(median)", "+ text", "÷ bare"]
        + ["own us", "+ text own us", "beam4", "÷ greedy"],
        _rows(
            r["engine"],
            *(model, "new_tokens", ms("bare"), ms("engine"), "engine_vs_bare"),
            *("engine_vs_bare_median", ms("engine_text"), "engine_text_vs_bare"),
            *("engine_own_us_per_token", "engine_text_own_us_per_token", ms("beam4")),
            "beam4_vs_greedy",
        ),
    )
    frames = table(
        f"One wire.Step frame of (1, T, {HIDDEN}) hidden states; round trip = encode + decode",
        ["dtype", "compr.", "T", "frame bytes", "÷ float32", "round trip us", "÷ float32"]
        + ["rel. error"],
        _rows(
            r["wire"],
            *("dtype", "compression", "tokens", commas("frame_bytes"), "bytes_vs_float32"),
            *("round_trip_us", "time_vs_float32", lambda w: f"{w['rel_error']:.2g}"),
        ),
    )
    cuts = table(
        f"rows_per_frame cutting a {list(PREFILL)} prefill into Step messages "
        "(every frame encoded)",
        ["dtype", "max frame", "tokens/piece", "pieces", "last piece", "largest frame", "fill"],
        _rows(
            r["cuts"],
            *("dtype", commas("max_frame"), "tokens_per_piece", "pieces", "last_piece_tokens"),
            *(commas("largest_frame"), "fill"),
        ),
    )
    return "\n\n".join(
        [
            detok + "\nboth outputs, concatenated, equal one full decode: yes",
            engine + "\nsame tokens from the engine and the bare loop: yes",
            frames,
            cuts,
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer lengths and runs (~30 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    limit_threads(args.threads)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="peerd-bench-gen-") as tmp:
        results = run(args.quick, Path(tmp))
    results["date"] = date
    results["command"] = "python -m benchmarks.bench_generation" + (
        " --quick" if args.quick else ""
    )
    results["threads"] = torch.get_num_threads()
    print(
        f"{results['command']}  ({date}, {results['threads']} torch thread(s), load "
        f"{results['load_before'][0]:.1f} → {results['load_after'][0]:.1f}, "
        f"{results['seconds']:.0f} s)\n"
    )
    print(report(results))
    write_json(args.out, results)


if __name__ == "__main__":
    main()

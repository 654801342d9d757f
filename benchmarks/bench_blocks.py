"""Block benchmark: our Llama block vs transformers' LlamaDecoderLayer, same weights, same run.

One Llama block (hidden 1024, 8 heads, 8 kv heads, ffn 2816, float32) saved as a checkpoint
and loaded twice: by `blocks.LoadedBlocks` and by transformers. Measured, at 1 and 2 torch threads:

- decode: latency of one new token against 512 cached tokens (batch 1). Ours is `LoadedBlocks.step`
  (input checks, rotary tables and the preallocated KV cache included); transformers' is its
  rotary embedding + decoder layer with a DynamicCache holding the same 512 tokens.
- prefill: tokens/s of a 128-token forward from position 0.

Repetitions are interleaved (ours, theirs, ours, ...) so that load from other processes hits
both alike; the headline is the best time of each (the least disturbed run), medians are shown
too. ratio = transformers time / our time (>= 1.0 means ours is not slower). Then int8 (LLM.int8) and NF4 spans against the float span: bytes
per parameter of the block and speed ratio (float time / quantized time).

    python -m benchmarks.bench_blocks [--reps 30] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from blocks import LoadedBlocks

HIDDEN, HEADS, KV_HEADS, FFN = 1024, 8, 8, 2816
CACHED, PREFILL = 512, 128


def make_checkpoint(path: Path) -> None:
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=FFN,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)


def median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


def best_ms(times: list[float]) -> float:
    return 1000 * min(times)


class Ours:
    def __init__(self, span: LoadedBlocks):
        self.span = span
        gen = torch.Generator().manual_seed(1)
        self.prefix = torch.randn(1, CACHED, HIDDEN, generator=gen).to(span.dtype)
        self.token = torch.randn(1, 1, HIDDEN, generator=gen).to(span.dtype)
        self.prompt = torch.randn(1, PREFILL, HIDDEN, generator=gen).to(span.dtype)
        self.cache = span.new_cache(1, CACHED + 1)
        span.step(self.prefix, self.cache)

    def decode(self) -> float:
        self.cache.truncate(CACHED)
        t0 = time.perf_counter()
        self.out = self.span.step(self.token, self.cache)
        return time.perf_counter() - t0

    def prefill(self) -> float:
        t0 = time.perf_counter()
        self.span.forward(self.prompt)
        return time.perf_counter() - t0


class Reference:
    """transformers' rotary embedding + decoder layer, called as LlamaModel calls them."""

    def __init__(self, path: Path, ours: Ours):
        import transformers as tf

        model = tf.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
        self.layer = model.model.layers[0]
        self.rotary = model.model.rotary_emb
        self.ours = ours
        self.cache_cls = tf.DynamicCache
        self.config = model.config
        with torch.no_grad():
            cache = self.cache_cls(config=self.config)
            self._run(ours.prefix, cache, 0)
        self.k0, self.v0 = cache.layers[0].keys.clone(), cache.layers[0].values.clone()

    def _run(self, x: torch.Tensor, cache, pos: int) -> torch.Tensor:
        positions = torch.arange(pos, pos + x.shape[1])[None]
        emb = self.rotary(x, positions)
        return self.layer(
            x, position_embeddings=emb, past_key_values=cache, use_cache=cache is not None
        )

    def decode(self) -> float:
        cache = self.cache_cls(config=self.config)
        cache.update(self.k0, self.v0, 0)
        with torch.no_grad():
            t0 = time.perf_counter()
            self.out = self._run(self.ours.token, cache, CACHED)
            return time.perf_counter() - t0

    def prefill(self) -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            self._run(self.ours.prompt, None, 0)
            return time.perf_counter() - t0


def compare_with_transformers(path: Path, reps: int) -> None:
    ours = Ours(LoadedBlocks.load(path, 0, 1))
    ref = Reference(path, ours)
    ours.decode(), ref.decode()
    diff = (ours.out - ref.out).abs().max().item()
    print(f"decode outputs: max abs diff ours vs transformers = {diff:.2e}")
    for name in ("decode", "prefill"):
        times = {"ours": [], "ref": []}
        n = reps if name == "decode" else max(5, reps // 3)
        for _ in range(n):  # interleaved, so load changes hit both alike
            times["ours"].append(getattr(ours, name)())
            times["ref"].append(getattr(ref, name)())
        o, r = best_ms(times["ours"]), best_ms(times["ref"])
        om, rm = median_ms(times["ours"]), median_ms(times["ref"])
        if name == "decode":
            print(
                f"  decode (1 token, {CACHED} cached): ours {o:7.2f} ms  transformers {r:7.2f} ms  "
                f"ratio {r / o:.2f}x (medians {om:.2f} / {rm:.2f} ms, ratio {rm / om:.2f}x)"
            )
        else:
            print(
                f"  prefill ({PREFILL} tokens):        ours {PREFILL / o * 1000:7.0f} tok/s  "
                f"transformers {PREFILL / r * 1000:7.0f} tok/s  ratio {r / o:.2f}x "
                f"(medians {PREFILL / om * 1000:.0f} / {PREFILL / rm * 1000:.0f} tok/s, ratio {rm / om:.2f}x)"
            )


def compare_quantization(path: Path, reps: int) -> None:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    spans = {q: LoadedBlocks.load(path, 0, 1, quant=q) for q in ("none", "int8", "nf4")}
    params = sum(p.numel() for p in spans["none"].blocks.parameters())
    runners = {q: Ours(s) for q, s in spans.items()}
    for r in runners.values():
        r.decode()
    times = {q: {"decode": [], "prefill": []} for q in runners}
    for _ in range(max(5, reps // 2)):
        for q, r in runners.items():
            times[q]["decode"].append(r.decode())
    for _ in range(max(3, reps // 6)):
        for q, r in runners.items():
            times[q]["prefill"].append(r.prefill())
    base = {k: best_ms(v) for k, v in times["none"].items()}
    ref_out = runners["none"].out
    for q, r in runners.items():
        d, p = best_ms(times[q]["decode"]), best_ms(times[q]["prefill"])
        err = ((r.out - ref_out).norm() / ref_out.norm()).item()
        print(
            f"  {q:5s}: {spans[q].nbytes / params:4.2f} bytes/param  decode {d:6.2f} ms "
            f"(speed x{base['decode'] / d:.2f})  prefill {p:7.1f} ms (speed x{base['prefill'] / p:.2f})  "
            f"rel. error {err:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        make_checkpoint(path)
        print(
            f"Llama block: hidden {HIDDEN}, {HEADS} heads, {KV_HEADS} kv heads, ffn {FFN}, float32; "
            f"torch {torch.__version__}"
        )
        for threads in args.threads:
            torch.set_num_threads(threads)
            print(f"\n[{threads} thread{'s' if threads > 1 else ''}] ours vs transformers")
            compare_with_transformers(path, args.reps)
            print(f"[{threads} thread{'s' if threads > 1 else ''}] quantized vs float (ours)")
            compare_quantization(path, args.reps)


if __name__ == "__main__":
    main()

"""The generation engine against transformers: greedy, beam search, batches, processors, stops.

Models run through our own blocks in this process (`LocalStep`); transformers' `generate` on
the same checkpoint is the reference. Scripted steps (logits that force chosen tokens) test
stop strings and streaming text on readable text.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer

from blocks import ClientParts, LoadedBlocks
from peerd.generation import (
    Generation,
    GenerationParams,
    LocalStep,
    generate_sync,
    run_async,
    run_sync,
)
from peerd.generation.detokenize import Detokenizer
from tests.tiny_models import VOCAB_SIZE, load_reference, make_tiny_model

PROMPTS = [[5, 17, 42, 7, 99, 4], [8, 9, 10, 11], [120, 6, 33, 250, 12, 77, 41, 5]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("gen") / "llama", "llama", num_layers=3)
    parts = ClientParts.load(path)
    return {
        "path": path,
        "parts": parts,
        "span": LoadedBlocks.load(path, 0, parts.config.num_blocks),
        "ref": load_reference(path),
        "tokenizer": Tokenizer.from_file(str(path / "tokenizer.json")),
    }


def run(model, prompts, params: GenerationParams, tokenizer=None):
    gen = Generation(prompts, params, tokenizer=tokenizer, vocab_size=VOCAB_SIZE)
    events = list(run_sync(gen, LocalStep(model["parts"], model["span"], gen.max_length)))
    return gen.result(), events


def reference(model, prompts, **kwargs) -> torch.Tensor:
    """transformers' generate over left-padded prompts (the mask says where the pads are)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return model["ref"].generate(ids, attention_mask=mask, **kwargs)


# ----- parity with transformers ---------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_transformers(model, penalty):
    params = GenerationParams.from_checkpoint(
        model["path"], max_new_tokens=10, repetition_penalty=penalty, eos_token_id=()
    )
    results, events = run(model, PROMPTS[:1], params)
    out = reference(
        model, PROMPTS[:1], max_new_tokens=10, do_sample=False, repetition_penalty=penalty,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    assert results[0].token_ids == out[0, len(PROMPTS[0]) :].tolist()
    assert results[0].full_ids == out[0].tolist()
    assert results[0].finish_reason == "length"
    assert [e.token_id for e in events] == results[0].token_ids


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_beam_search_equals_transformers(model, early_stopping):
    prompts = PROMPTS[:2]  # different lengths: left padding under the beams too
    # frequent tokens of this model as EOS ids, so that hypotheses finish at different lengths
    eos = [134, 199]
    kwargs = dict(
        max_new_tokens=7, num_beams=3, length_penalty=0.7, early_stopping=early_stopping,
        num_return_sequences=2, eos_token_id=eos, pad_token_id=0,
    )  # fmt: skip
    params = GenerationParams.from_checkpoint(model["path"], **kwargs)
    results, events = run(model, prompts, params)
    out = reference(
        model, prompts, do_sample=False, output_scores=True, return_dict_in_generate=True,
        **kwargs,
    )  # fmt: skip
    width = max(len(p) for p in prompts)
    fill = eos[0]  # transformers fills short hypotheses with `pad_token_id or eos[0]`
    got = [s.token_ids for r in results for s in r.sequences]
    length = out.sequences.shape[1] - width
    assert [s + [fill] * (length - len(s)) for s in got] == out.sequences[:, width:].tolist()
    scores = torch.tensor([s.score for r in results for s in r.sequences])
    torch.testing.assert_close(scores, out.sequences_scores, rtol=1e-5, atol=1e-5)
    assert any(s.finish_reason == "eos" for r in results for s in r.sequences)
    # beams are reported once, at the end, sequence by sequence
    by_sequence = {}
    for e in events:
        by_sequence.setdefault((e.prompt_index, e.sequence), []).append(e.token_id)
    assert list(by_sequence.values()) == got


def test_beam_search_reorders_caches(model):
    """Some step must reorder beams, or the parity above would not exercise cache reordering."""
    params = GenerationParams(max_new_tokens=6, num_beams=3)
    gen = Generation(PROMPTS[:2], params, vocab_size=VOCAB_SIZE)
    step = LocalStep(model["parts"], model["span"], gen.max_length)
    reorders = []
    request = gen.first_request()
    while request is not None:
        reorders.append(request.reorder)
        request = gen.feed(step(request)).next
    assert reorders[0] is None
    assert any(r is not None for r in reorders)


def test_batch_of_prompts_equals_each_prompt_alone(model):
    params = GenerationParams(max_new_tokens=8, repetition_penalty=1.2)
    batch, events = run(model, PROMPTS, params)
    alone = [run(model, [p], params)[0][0] for p in PROMPTS]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    out = reference(
        model, PROMPTS, max_new_tokens=8, do_sample=False, repetition_penalty=1.2,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    width = max(len(p) for p in PROMPTS)
    assert [r.token_ids for r in batch] == out[:, width:].tolist()
    for i, result in enumerate(batch):
        assert [e.token_id for e in events if e.prompt_index == i] == result.token_ids


def test_finished_rows_get_pad_tokens_and_no_events(model):
    free = run(model, PROMPTS[:2], GenerationParams(max_new_tokens=6))[0]
    eos = free[0].token_ids[1]  # the first prompt's second token ends it
    params = GenerationParams(max_new_tokens=6, eos_token_id=eos, pad_token_id=9)
    gen = Generation(PROMPTS[:2], params, vocab_size=VOCAB_SIZE)
    step = LocalStep(model["parts"], model["span"], gen.max_length)
    request, fed, events = gen.first_request(), [], []
    while request is not None:
        update = gen.feed(step(request))
        events += update.events
        request = update.next
        if request is not None:
            fed.append(request.input_ids[:, 0].tolist())
    results = gen.result()
    first = free[0].token_ids[: free[0].token_ids.index(eos) + 1]
    assert results[0].token_ids == first and results[0].finish_reason == "eos"
    assert [e.token_id for e in events if e.prompt_index == 0] == first
    assert all(row[0] == 9 for row in fed[len(first) :])  # the finished row is fed pads
    assert len([e for e in events if e.prompt_index == 1]) == len(results[1].token_ids)


def test_sampling_is_reproducible_with_a_seed(model):
    def sample(seed: int, top_k: int = 0) -> list[int]:
        params = GenerationParams(
            max_new_tokens=8, do_sample=True, temperature=1.5, top_k=top_k, seed=seed
        )
        return run(model, PROMPTS[:1], params)[0][0].token_ids

    assert sample(1) == sample(1)
    assert len({tuple(sample(s)) for s in range(3)}) > 1
    greedy = run(model, PROMPTS[:1], GenerationParams(max_new_tokens=8))[0][0].token_ids
    assert sample(3, top_k=1) == greedy


def test_sampling_several_sequences_per_prompt(model):
    params = GenerationParams(max_new_tokens=4, do_sample=True, num_return_sequences=3, seed=0)
    results, events = run(model, PROMPTS[:2], params)
    assert [len(r.sequences) for r in results] == [3, 3]
    for p, result in enumerate(results):
        for j, seq in enumerate(result.sequences):
            mine = [e.token_id for e in events if (e.prompt_index, e.sequence) == (p, j)]
            assert mine == seq.token_ids


def test_run_async_needs_no_event_loop_library(model):
    params = GenerationParams(max_new_tokens=5)
    gen = Generation(PROMPTS[:1], params, vocab_size=VOCAB_SIZE)
    step = LocalStep(model["parts"], model["span"], gen.max_length)

    async def astep(request):
        return step(request)

    async def collect():
        return [e.token_id async for e in run_async(gen, astep)]

    tokens = asyncio.run(collect())
    alone = Generation(PROMPTS[:1], params, vocab_size=VOCAB_SIZE)
    sync = generate_sync(alone, LocalStep(model["parts"], model["span"], alone.max_length))
    assert tokens == sync[0].token_ids == gen.result()[0].token_ids


def test_the_engine_imports_neither_trio_nor_libp2p():
    code = (
        "import sys, peerd.generation; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('trio', 'libp2p')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----- stops and text, with scripted logits ---------------------------------------------------


def scripted(tokens: list[int]):
    """A step that makes the engine pick `tokens` in order (one row), then EOS id 2."""
    script = iter([*tokens, *[2] * 1000])

    def step(request):
        logits = torch.zeros(1, VOCAB_SIZE)
        logits[0, next(script)] = 10.0
        return logits

    return step


TEXT = "Hello wörld, 日本語 and the end. More text after"


def script_run(model, params, text=TEXT, prompt="The quick"):
    tok = model["tokenizer"]
    ids = tok.encode(text).ids
    gen = Generation([tok.encode(prompt).ids], params, tokenizer=tok, vocab_size=VOCAB_SIZE)
    events = list(run_sync(gen, scripted(ids)))
    return gen.result()[0], events, ids


def test_streamed_text_equals_the_full_decode(model):
    params = GenerationParams(max_new_tokens=200, eos_token_id=2)
    result, events, ids = script_run(model, params)
    assert result.token_ids == [*ids, 2] and result.finish_reason == "eos"
    assert "".join(e.text for e in events) == result.text == TEXT
    assert sum(1 for e in events if e.text == "") > 0  # multi-byte characters were held back


@pytest.mark.parametrize(
    "stops, expected",
    [
        (["日本"], "Hello wörld, "),
        (["the end", "wörld"], "Hello "),  # the earliest stop string in the text wins
        (["end.", "zzz"], "Hello wörld, 日本語 and the "),
    ],
)
def test_stop_strings_cut_the_text(model, stops, expected):
    result, events, ids = script_run(model, GenerationParams(max_new_tokens=200, stop=stops))
    assert result.finish_reason == "stop"
    assert result.text == expected == "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop"
    assert len(result.token_ids) < len(ids)  # generation stopped right there
    assert not any(s in "".join(e.text for e in events) for s in stops)


def test_a_stop_prefix_is_held_back_and_released(model):
    """The text "wör" starts the stop string "wörm" but the text goes on: it must come out, unchanged."""
    params = GenerationParams(max_new_tokens=200, stop=["wörm"], eos_token_id=2)
    result, events, _ = script_run(model, params)
    assert result.finish_reason == "eos"
    assert "".join(e.text for e in events) == result.text == TEXT


def test_several_eos_ids_stop_at_the_first(model):
    tok = model["tokenizer"]
    ids = tok.encode(TEXT).ids
    eos = [ids[6], 2, ids[9]]
    result, events, _ = script_run(model, GenerationParams(max_new_tokens=200, eos_token_id=eos))
    first = min(ids.index(e) for e in eos if e in ids)
    assert result.token_ids == ids[: first + 1]  # EOS kept in the ids, like transformers
    assert result.finish_reason == "eos" == events[-1].finish_reason
    assert result.text == tok.decode(ids[: first + 1])


def test_max_new_tokens_ends_with_length(model):
    result, events, ids = script_run(model, GenerationParams(max_new_tokens=5))
    assert result.token_ids == ids[:5] and result.finish_reason == "length"
    assert len(events) == 5 and events[-1].finish_reason == "length"


def test_detokenizer_is_incremental_and_exact(model):
    tok = model["tokenizer"]
    prompt = tok.encode("Peer to").ids
    for text in ["Hello wörld, 日本語!", " ünïcödé — ≠ 🙂 ok", "plain ascii"]:
        ids = tok.encode(text).ids
        detok = Detokenizer(tok, prompt)
        pieces = [detok.push(i) for i in ids] + [detok.flush()]
        assert "".join(pieces) == tok.decode(ids)
        assert tok.decode(prompt + ids) == tok.decode(prompt) + "".join(pieces)
    # cut inside a character: the rest comes out as U+FFFD at the end, as decode() shows it
    ids = tok.encode("ab日").ids[:-1]
    detok = Detokenizer(tok)
    assert "".join([detok.push(i) for i in ids] + [detok.flush()]) == tok.decode(ids)


def test_bad_inputs_are_value_errors(model):
    params = GenerationParams(max_new_tokens=2)
    for prompts in ([], [[]], [[VOCAB_SIZE]], [[1, "a"]]):
        with pytest.raises(ValueError):
            Generation(prompts, params, vocab_size=VOCAB_SIZE)
    with pytest.raises(ValueError, match="tokenizer"):
        Generation([[1]], GenerationParams(stop=["x"]), vocab_size=VOCAB_SIZE)
    gen = Generation([[1, 2]], params, vocab_size=VOCAB_SIZE)
    with pytest.raises(RuntimeError):
        gen.feed(torch.zeros(1, VOCAB_SIZE))
    gen.first_request()
    with pytest.raises(ValueError, match="shape"):
        gen.feed(torch.zeros(2, VOCAB_SIZE))
    with pytest.raises(RuntimeError, match="not over"):
        gen.result()
    assert gen.feed(torch.zeros(1, VOCAB_SIZE)).next is not None


def test_beam_sampling_is_reproducible(model):
    params = GenerationParams(
        max_new_tokens=5, num_beams=2, do_sample=True, top_k=20, seed=4, num_return_sequences=2
    )
    first, _ = run(model, PROMPTS[:2], params)
    again, _ = run(model, PROMPTS[:2], params)
    assert [[s.token_ids for s in r.sequences] for r in first] == [
        [s.token_ids for s in r.sequences] for r in again
    ]
    assert all(
        len(r.sequences) == 2 and r.sequences[0].score >= r.sequences[1].score for r in first
    )

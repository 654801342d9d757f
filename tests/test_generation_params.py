"""Logits processors against transformers' LogitsProcessors; parameters and their defaults."""

from __future__ import annotations

import json

import pytest
import torch
import transformers.generation.logits_process as tlp

from peerd.generation import GenerationParams, defaults_for
from peerd.generation.processors import (
    MinP,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    processors_for,
    seen_tokens,
)
from tests.tiny_models import VOCAB_SIZE

# ----- processors against transformers' ---------------------------------------------------------


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (RepetitionPenalty(1.4), tlp.RepetitionPenaltyLogitsProcessor(1.4)),
        (RepetitionPenalty(0.7), tlp.RepetitionPenaltyLogitsProcessor(0.7)),
        (Temperature(0.6), tlp.TemperatureLogitsWarper(0.6)),
        (TopK(5), tlp.TopKLogitsWarper(5)),
        (TopK(1, 3), tlp.TopKLogitsWarper(1, min_tokens_to_keep=3)),
        (TopP(0.8), tlp.TopPLogitsWarper(0.8)),
        (TopP(0.05, 2), tlp.TopPLogitsWarper(0.05, min_tokens_to_keep=2)),
        (MinP(0.1), tlp.MinPLogitsWarper(0.1)),
        (MinP(0.9, 3), tlp.MinPLogitsWarper(0.9, min_tokens_to_keep=3)),
    ],
    ids=lambda p: type(p).__name__,
)
def test_processors_equal_transformers(ours, theirs):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, VOCAB_SIZE, generator=g) * 3
    ids = torch.randint(0, VOCAB_SIZE, (4, 12), generator=g)
    expected = theirs(ids, scores.clone())
    got = ours(scores.clone(), seen_tokens(ids, VOCAB_SIZE))
    torch.testing.assert_close(got, expected)


def test_processor_order_and_choice_follow_transformers():
    params = GenerationParams(
        do_sample=True, temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.1
    )
    assert [type(p).__name__ for p in processors_for(params)] == [
        "RepetitionPenalty", "Temperature", "TopK", "TopP", "MinP",
    ]  # fmt: skip
    greedy = GenerationParams(temperature=0.7, top_k=10, repetition_penalty=1.1)
    assert [type(p).__name__ for p in processors_for(greedy)] == ["RepetitionPenalty"]
    beams = GenerationParams(do_sample=True, num_beams=2, top_k=3, eos_token_id=[1, 2])
    assert processors_for(beams)[0] == TopK(3, 3)  # one more than the EOS ids


# ----- parameters -------------------------------------------------------------------------------


def test_checkpoint_defaults_are_read_and_overridden(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 0}))
    assert defaults_for(tmp_path) == {"eos_token_id": 2, "pad_token_id": 0}
    assert GenerationParams.from_checkpoint(tmp_path).eos_token_id == (2,)
    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [128001, 128009],
             "max_length": 4096, "bos_token_id": 128000}
        )
    )  # fmt: skip
    params = GenerationParams.from_checkpoint(tmp_path)
    assert params.eos_token_id == (128001, 128009)  # generation_config.json beats config.json
    assert (params.do_sample, params.temperature, params.top_p) == (True, 0.6, 0.9)
    assert params.pad_token_id == 0 and params.top_k == 50 and params.max_new_tokens == 20
    mine = GenerationParams.from_checkpoint(
        tmp_path, temperature=1.3, do_sample=False, top_p=None, eos_token_id=()
    )
    assert (mine.temperature, mine.do_sample, mine.top_p) == (1.3, False, 0.9)
    assert mine.eos_token_id == ()
    with pytest.raises(ValueError, match="unknown generation parameter"):
        GenerationParams.from_checkpoint(tmp_path, temprature=1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"num_return_sequences": 2}, "num_return_sequences"),
        ({"num_beams": 2, "stop": ["x"]}, "beam"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"eos_token_id": [-1]}, "eos_token_id"),
        ({"stop": [""]}, "stop"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_parameters_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationParams(**kwargs)


def test_a_checkpoint_pad_id_of_minus_one_means_none(tmp_path):
    """LLaMA-1 configs say pad_token_id -1: generation must not refuse every prompt for it."""
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": -1}))
    params = GenerationParams.from_checkpoint(tmp_path)
    assert params.pad_token_id is None and params.pad_id == 2

"""One generation engine, seen end to end through real daemons on loopback: the daemon's
`generate`, the torch client and the demo's loop agree; batches of prompts of different
lengths, beam search and a checkpoint with several EOS ids (as Llama 3's) behave as in
transformers. One swarm for the module: a bootstrap and two servers of a tiny Llama."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from blocks import ClientParts
from peerd.client import AutoDistributedModelForCausalLM, DaemonClient
from peerd.demo.run import swarm_greedy
from tests.launcher import HarnessGroup, wait_until_listed
from tests.tiny_models import load_reference, make_tiny_model
from wire.local import Generate

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 42, 7, 99, 3, 61], [8, 9, 10], [44, 45, 46, 47, 48]]
NEW = 6


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-gen")
    model = make_tiny_model(root / "tiny-llama", "llama", num_layers=4, num_key_value_heads=2)
    with HarnessGroup(root / "homes", announce_period=5.0) as group:
        boot = group.start("boot", "--new-swarm")
        group.start_servers(model, {"a": "0:2", "b": "2:4"}, boot)
        client = DaemonClient(boot.socket, timeout=120)
        wait_until_listed(client, 2)
        yield {"root": root, "model": model, "client": client}


def daemon_generate(client: DaemonClient, model, prompt, **fields) -> list[int]:
    request = Generate(model=str(model), input_ids=prompt, max_new_tokens=NEW, **fields)
    return list(client.generate_events(request))[-1].token_ids


def test_daemon_torch_client_and_demo_loop_agree_with_transformers(swarm):
    model, client = swarm["model"], swarm["client"]
    prompt = PROMPTS[0]
    by_daemon = daemon_generate(client, model, prompt, eos_token_id=[])
    lm = AutoDistributedModelForCausalLM.from_pretrained(model, peer=client)
    by_torch_client = lm.generate(torch.tensor([prompt]), max_new_tokens=NEW, eos_token_id=[])
    with client.session(model, len(prompt) + NEW) as session:
        by_demo_loop = swarm_greedy(session, ClientParts.load(model), prompt, NEW)
    expected = load_reference(model).generate(
        torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    assert by_daemon == by_demo_loop == by_torch_client[0, len(prompt) :].tolist()
    assert by_daemon == expected[0, len(prompt) :].tolist()


def test_batch_of_prompts_of_different_lengths_equals_single_runs(swarm):
    model, client = swarm["model"], swarm["client"]
    lm = AutoDistributedModelForCausalLM.from_pretrained(model, peer=client)
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[3] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    batched = lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    for row, prompt in enumerate(PROMPTS):
        alone = lm.generate(torch.tensor([prompt]), max_new_tokens=NEW, eos_token_id=[])
        assert batched[row, width:].tolist() == alone[0, len(prompt) :].tolist()


def test_beam_search_through_the_swarm_equals_transformers(swarm):
    model, client = swarm["model"], swarm["client"]
    prompts = PROMPTS[::2]
    lm = AutoDistributedModelForCausalLM.from_pretrained(model, peer=client)
    kwargs = dict(max_new_tokens=NEW, num_beams=3, num_return_sequences=2, length_penalty=0.7)
    width = max(map(len, prompts))
    ids = torch.tensor([[3] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = lm.generate(ids, attention_mask=mask, **kwargs)
    ref = load_reference(model).generate(
        ids, attention_mask=mask, do_sample=False, pad_token_id=3, **kwargs
    )
    assert out.tolist() == ref.tolist()
    by_daemon = daemon_generate(client, model, PROMPTS[0], num_beams=3, eos_token_id=[])
    best = load_reference(model).generate(
        torch.tensor([PROMPTS[0]]), max_new_tokens=NEW, min_new_tokens=NEW, num_beams=3,
        do_sample=False, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    assert by_daemon == best[0, len(PROMPTS[0]) :].tolist()


def test_several_eos_ids_from_generation_config_stop_generation(swarm):
    """A copy of the checkpoint (same name and weights: the same model id) whose
    generation_config.json lists two EOS ids, the second one a token the model does produce."""
    model, client = swarm["model"], swarm["client"]
    free = daemon_generate(client, model, PROMPTS[1], eos_token_id=[])
    copy = swarm["root"] / "copy" / model.name
    shutil.copytree(model, copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, free[2]]}))
    events = list(
        client.generate_events(Generate(model=str(copy), input_ids=PROMPTS[1], max_new_tokens=NEW))
    )
    done = events[-1]
    assert done.stop_reason == "eos"
    assert done.token_ids == free[: free.index(free[2]) + 1]

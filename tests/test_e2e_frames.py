"""End to end with 1 MiB frames: a 4,096-token prompt is cut into frames on every link.

Real daemons on loopback, all started with `--max-frame-mib 1`: a client `peerd join`
(whose socket the test uses) and two `peerd serve` daemons holding all blocks of a tiny
Llama (hidden size 128: the prompt's hidden states are 2 MiB in float32). Greedy generation
must equal transformers', also when the server in use is killed with SIGKILL mid-generation
and its replacement gets the whole context (~4,100 tokens) replayed, again cut into frames.
"""

from __future__ import annotations

import pytest
import torch

from blocks import ClientParts
from peerd.client import DaemonClient
from tests.tiny_models import load_reference, make_tiny_model
from wire.local import Generate

pytestmark = pytest.mark.slow

NUM_BLOCKS = 4
PROMPT_TOKENS = 4096
NEW_TOKENS = 6
FRAME_MIB = "1"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    from tests.launcher import HarnessGroup as DaemonGroup
    from tests.launcher import wait_until_listed

    root = tmp_path_factory.mktemp("frames")
    model_dir = make_tiny_model(
        root / "tiny-llama",
        "llama",
        num_layers=NUM_BLOCKS,
        hidden_size=128,
        num_key_value_heads=2,
        max_position_embeddings=PROMPT_TOKENS + 256,
    )
    frame = ("--max-frame-mib", FRAME_MIB)
    with DaemonGroup(root / "homes", announce_period=5.0) as group:
        boot = group.start("client", "--new-swarm", *frame)
        servers = group.start_servers(
            model_dir, {"s1": f"0:{NUM_BLOCKS}", "s2": f"0:{NUM_BLOCKS}"}, boot, *frame
        )
        peer = DaemonClient(boot.socket, timeout=120)
        wait_until_listed(peer, len(servers))
        yield {"model": model_dir, "servers": servers, "peer": peer}


@pytest.fixture(scope="module")
def prompt_and_expected(swarm):
    prompt = torch.randint(4, 384, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0))
    ref = load_reference(swarm["model"])
    out = ref.generate(
        prompt[None],
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        min_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        pad_token_id=0,
    )
    return prompt.tolist(), out[0, PROMPT_TOKENS:].tolist()


def test_long_prompt_generates_as_transformers_with_small_frames(swarm, prompt_and_expected):
    prompt, expected = prompt_and_expected
    request = Generate(model=str(swarm["model"]), input_ids=prompt, max_new_tokens=NEW_TOKENS)
    done = list(swarm["peer"].generate_events(request))[-1]
    assert done.token_ids == expected
    assert done.recoveries == []


def test_kill_the_server_in_use_and_the_cut_replay_gives_the_same_tokens(
    swarm, prompt_and_expected
):
    prompt, expected = prompt_and_expected
    parts = ClientParts.load(swarm["model"])
    by_peer = {d.peer_id: name for name, d in swarm["servers"].items()}
    generated: list[int] = []
    with swarm["peer"].session(swarm["model"], PROMPT_TOKENS + NEW_TOKENS) as session:
        assert session.max_frame == 2**20
        hidden = parts.embed(torch.tensor([prompt]))  # 2 MiB: cut by the session, then the chain
        for step in range(NEW_TOKENS):
            if step == 3:
                victim = session.route[0][0]
                swarm["servers"][by_peer[victim]].kill()
            out = session.step(hidden)
            token = int(parts.logits(out[:, -1:])[0, -1].argmax())
            generated.append(token)
            hidden = parts.embed(torch.tensor([[token]]), past_length=PROMPT_TOKENS + step)
        assert session.recoveries == 1
        assert session.route[0][0] != victim
    assert generated == expected

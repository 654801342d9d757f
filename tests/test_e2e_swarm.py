"""End to end through the local socket, with real daemons on loopback.

One swarm for the module: a bootstrap `peerd join` (whose socket the tests use) and four
`peerd serve` daemons of a tiny Llama saved by transformers: a[0:3), b1[3:6), b2[3:6), c[6:8).
Tests that kill a server run last.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch
from click.testing import CliRunner

from blocks import ClientParts, LoadedBlocks
from peerd.client import AutoDistributedModelForCausalLM, DaemonClient, PeerdError
from tests.launcher import HarnessGroup as DaemonGroup
from tests.launcher import wait_until_listed
from tests.tiny_models import load_reference, make_tiny_model

pytestmark = pytest.mark.slow

NUM_BLOCKS = 8
SERVERS = {"a": "0:3", "b1": "3:6", "b2": "3:6", "c": "6:8"}
PROMPT_IDS = [5, 17, 42, 7, 99, 3]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model_dir = make_tiny_model(
        root / "tiny-llama", "llama", num_layers=NUM_BLOCKS, num_key_value_heads=2
    )
    with DaemonGroup(root / "homes", announce_period=5.0) as group:
        boot = group.start("boot", "--new-swarm")
        servers = group.start_servers(model_dir, SERVERS, boot)
        peer = DaemonClient(boot.socket, timeout=120)
        wait_until_listed(peer, len(SERVERS))
        yield {
            "root": root,
            "model": model_dir,
            "boot": boot,
            "servers": servers,
            "peer": peer,
            "group": group,
        }


def reference_greedy(model_dir, prompt, new_tokens):
    ref = load_reference(model_dir)
    out = ref.generate(
        torch.tensor([prompt]),
        max_new_tokens=new_tokens,
        do_sample=False,
        min_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def test_socket_is_private(swarm):
    mode = stat.S_IMODE(os.stat(swarm["boot"].socket).st_mode)
    assert mode == 0o600


def test_generation_through_three_servers_equals_transformers(swarm):
    peer = swarm["peer"]
    events = list(
        peer.generate_events(
            __import__("wire.local", fromlist=["Generate"]).Generate(
                model=str(swarm["model"]), input_ids=PROMPT_IDS, max_new_tokens=12
            )
        )
    )
    done = events[-1]
    assert done.token_ids == reference_greedy(swarm["model"], PROMPT_IDS, 12)
    assert [e.token_id for e in events[:-1]] == done.token_ids  # streamed one by one
    assert [hop[1:] for hop in done.route] == [(0, 3), (3, 6), (6, 8)]


def test_a_server_reaches_its_own_blocks_in_process(swarm):
    """Through server a's own socket: the chain's first hop is a itself (an in-process pipe)."""
    server = swarm["servers"]["a"]
    events = list(
        DaemonClient(server.socket, timeout=120).generate_events(
            __import__("wire.local", fromlist=["Generate"]).Generate(
                model=str(swarm["model"]), input_ids=PROMPT_IDS, max_new_tokens=6
            )
        )
    )
    done = events[-1]
    assert done.route[0] == (server.peer_id, 0, 3)
    assert done.token_ids == reference_greedy(swarm["model"], PROMPT_IDS, 6)


def test_hf_style_model_generate_equals_transformers(swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(swarm["model"], peer=swarm["peer"])
    prompt = torch.tensor([PROMPT_IDS, PROMPT_IDS[::-1]])
    out = model.generate(prompt, max_new_tokens=6)
    ref = load_reference(swarm["model"]).generate(
        prompt,
        max_new_tokens=6,
        do_sample=False,
        min_new_tokens=6,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert out.tolist() == ref.tolist()


def test_text_generation_and_generate_command(swarm):
    text = swarm["peer"].generate(str(swarm["model"]), "hello world", max_new_tokens=5)
    assert isinstance(text, str)
    from cli.main import cli

    result = CliRunner().invoke(
        cli,
        [
            "generate",
            "--model",
            str(swarm["model"]),
            "--socket",
            str(swarm["boot"].socket),
            "--max-new-tokens",
            "5",
            "hello world",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == text.strip()


def test_two_scripts_generate_at_once(swarm):
    expected = reference_greedy(swarm["model"], PROMPT_IDS, 8)
    results: dict[int, list[int]] = {}

    def script(i: int) -> None:
        from wire.local import Generate

        events = list(
            swarm["peer"].generate_events(
                Generate(model=str(swarm["model"]), input_ids=PROMPT_IDS, max_new_tokens=8)
            )
        )
        results[i] = events[-1].token_ids

    threads = [threading.Thread(target=script, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {0: expected, 1: expected}


def test_garbage_on_the_socket_gets_an_error_and_the_daemon_carries_on(swarm):
    path = str(swarm["boot"].socket)
    for garbage in (
        struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1",
        b"\xff\xff\xff\xff",
        struct.pack(">I", 3) + b"\x93\x01\x02",
    ):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(garbage)
            header = s.recv(4)
            (length,) = struct.unpack(">I", header)
            import msgpack

            reply = msgpack.unpackb(s.recv(length))
            assert reply["type"] == "error" and reply["code"] in ("bad_request", "too_large")
    assert swarm["peer"].models()  # still serving


def test_status_command_shows_coverage(swarm):
    from cli.main import cli

    result = CliRunner().invoke(cli, ["status", "--socket", str(swarm["boot"].socket)])
    assert result.exit_code == 0, result.output
    assert "coverage  11122211" in result.output
    assert "gaps      none" in result.output


def test_training_through_the_swarm_matches_local_gradients(swarm):
    from peerd.client import RemoteBlocks

    torch.manual_seed(0)
    hidden_size = ClientParts.load(swarm["model"]).config.hidden_size
    x = torch.randn(2, 5, hidden_size, requires_grad=True)
    prompts = torch.randn(NUM_BLOCKS, 1, 2, hidden_size, requires_grad=True) * 0.1
    prompts.retain_grad()
    blocks = RemoteBlocks(swarm["model"], swarm["peer"])
    out = blocks(x, prompts)
    loss = (out**2).mean()
    loss.backward()
    span = LoadedBlocks.load(swarm["model"], 0, NUM_BLOCKS)
    expected = span.forward(x.detach(), prompts=prompts.detach())
    grad_out = 2 * expected / expected.numel()
    grad_x, grad_p = span.backward(x.detach(), grad_out, prompts=prompts.detach())
    torch.testing.assert_close(out.detach(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad, grad_x, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(prompts.grad, grad_p, atol=1e-6, rtol=1e-4)


def test_unknown_model_is_a_clear_error(swarm):
    with pytest.raises(PeerdError, match="no server in the swarm serves 'nonexistent'"):
        swarm["peer"].session("nonexistent", 8).open()


def test_client_library_imports_without_torch(tmp_path):
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    code = "import peerd.client as c; p = c.DaemonClient('/nonexistent.sock'); import sys; assert 'torch' not in sys.modules; print('ok')"
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.getcwd()}")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_kill_middle_server_mid_generation_gives_identical_output(swarm):
    """kill -9 the middle server after 4 tokens; the spare takes over; same greedy tokens."""
    model_dir, peer = swarm["model"], swarm["peer"]
    parts = ClientParts.load(model_dir)
    new_tokens = 10
    expected = reference_greedy(model_dir, PROMPT_IDS, new_tokens)
    by_peer = {d.peer_id: name for name, d in swarm["servers"].items()}
    generated: list[int] = []
    with peer.session(model_dir, len(PROMPT_IDS) + new_tokens) as session:
        hidden = parts.embed(torch.tensor([PROMPT_IDS]))
        for step in range(new_tokens):
            if step == 4:
                middle = session.route[1][0]
                assert by_peer[middle] in ("b1", "b2")
                swarm["servers"][by_peer[middle]].kill()
            out = session.step(hidden)
            token = int(parts.logits(out[:, -1:])[0, -1].argmax())
            generated.append(token)
            hidden = parts.embed(torch.tensor([[token]]), past_length=len(PROMPT_IDS) + step)
        assert session.recoveries == 1
        assert session.route[1][0] != middle and by_peer[session.route[1][0]] in ("b1", "b2")
    assert generated == expected


def test_no_server_for_some_blocks_names_them(swarm):
    """After the last holder of blocks 6..7 dies, a new chain says which blocks are missing."""
    swarm["servers"]["c"].kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            swarm["peer"].session(swarm["model"], 8).open().close()
        except PeerdError as exc:
            assert exc.code == "no_route"
            assert "blocks 6..8 are not served by anyone" in exc.message
            return
        time.sleep(1)
    pytest.fail("a chain still opened after the only server of blocks 6..7 was killed")

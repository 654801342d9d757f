"""The demo: a private swarm on loopback, greedy generation, a server killed mid-way.

bootstrap (client daemon with the local socket) + three servers of a generated 8-block
Llama: A holds blocks 0..3, B and C both hold 4..7. The script generates through the
bootstrap's socket, kills (SIGKILL) whichever of B/C its chain uses after a few tokens, and
shows that the chain recovered (replaying its cached inputs to the other one) and that the
text equals single-process generation with the same weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from blocks import ClientParts, LoadedBlocks
from peerd.client import DaemonClient
from peerd.demo.processes import DaemonGroup, wait_until_listed
from peerd.demo.tiny import TinyLlama, write_tiny_llama
from peerd.generation import (
    Generation,
    GenerationParams,
    LocalStep,
    StepRequest,
    embed_request,
    generate_sync,
    last_logits,
)

PROMPT = "A swarm is only as fast as"
SERVERS = (("server-a", "0:4"), ("server-b", "4:8"), ("server-c", "4:8"))


def greedy_params(new_tokens: int) -> GenerationParams:
    """Exactly `new_tokens` greedy tokens (no EOS stop), so both runs are the same length."""
    return GenerationParams(max_new_tokens=new_tokens, eos_token_id=())


def local_greedy(model_dir: Path, input_ids: list[int], new_tokens: int) -> list[int]:
    """Single-process generation with the same weights: the reference the swarm must match."""
    parts = ClientParts.load(model_dir)
    span = LoadedBlocks.load(model_dir, 0, parts.config.num_blocks)
    gen = Generation([input_ids], greedy_params(new_tokens), vocab_size=parts.config.vocab_size)
    with torch.no_grad():
        return generate_sync(gen, LocalStep(parts, span, gen.max_length))[0].token_ids


def swarm_greedy(
    session,
    parts: ClientParts,
    input_ids: list[int],
    new_tokens: int,
    *,
    before_step: Callable[[int], None] = lambda step: None,
    after_step: Callable[[int, float], None] = lambda step, seconds: None,
) -> list[int]:
    """Greedy generation through an open chain session (`peerd.client` ChainSession); the
    hooks see each step's number (and its duration), e.g. to kill a server mid-way."""
    gen = Generation([input_ids], greedy_params(new_tokens), vocab_size=parts.config.vocab_size)
    steps = 0

    def step(request: StepRequest) -> torch.Tensor:
        nonlocal steps
        before_step(steps)
        began = time.monotonic()
        out = session.step(embed_request(parts, request))
        after_step(steps, time.monotonic() - began)
        steps += 1
        return last_logits(parts, out)

    with torch.no_grad():
        return generate_sync(gen, step)[0].token_ids


def _short(peer_id: str) -> str:
    return "…" + peer_id[-6:]


def run_demo(
    workdir: Path, *, new_tokens: int = 24, kill_after: int = 8, echo: Callable[[str], None] = print
) -> bool:
    """Run the whole demo in `workdir`; True when the output survived the failure unchanged."""
    workdir = Path(workdir)
    began = time.monotonic()
    echo(f"1. Writing a tiny random-weight Llama checkpoint to {workdir / 'tiny-llama'}")
    model_dir = write_tiny_llama(workdir / "tiny-llama", TinyLlama(num_layers=8))
    parts = ClientParts.load(model_dir)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    input_ids = tokenizer.encode(PROMPT).ids
    reference = local_greedy(model_dir, input_ids, new_tokens)

    with DaemonGroup(workdir / "swarm", announce_period=2.0) as group:
        echo("2. Starting a private swarm on 127.0.0.1: a bootstrap peer and three servers")
        boot = group.start("bootstrap", "--new-swarm")
        echo(f"   bootstrap {_short(boot.peer_id)} at {boot.addrs[0]}")
        servers = group.start_servers(model_dir, dict(SERVERS), boot)
        for name, blocks in SERVERS:
            a, b = (int(x) for x in blocks.split(":"))
            echo(f"   {name} {_short(servers[name].peer_id)} serves blocks {a}..{b - 1}")
        peer = DaemonClient(boot.socket)
        wait_until_listed(peer, len(SERVERS))
        by_peer = {d.peer_id: name for name, d in servers.items()}

        echo(f"3. Generating {new_tokens} tokens greedily after {PROMPT!r}")
        killed = None
        with peer.session(model_dir, len(input_ids) + new_tokens) as session:

            def route() -> str:
                return "  →  ".join(
                    f"{by_peer.get(p, p)}[{a}..{b - 1}]" for p, a, b in session.route
                )

            def kill(step: int) -> None:
                nonlocal killed
                if step == kill_after:
                    victim = session.route[-1][0]
                    killed = by_peer[victim]
                    servers[killed].kill()
                    echo(
                        f"\n   ✗ killed {killed} ({_short(victim)}) with SIGKILL after {step} tokens"
                    )

            def recovered(step: int, seconds: float) -> None:
                if step == kill_after:
                    echo(f"   ✓ recovered in {seconds:.2f} s; route now: {route()}")

            echo(f"   route: {route()}")
            generated = swarm_greedy(
                session, parts, input_ids, new_tokens, before_step=kill, after_step=recovered
            )
        text = tokenizer.decode(generated)
        echo(f"   swarm output:     {text!r}")
        echo(f"   single process:   {tokenizer.decode(reference)!r}")
        same = generated == reference
        echo(
            f"4. {'Identical' if same else 'DIFFERENT'} token ids with and without the failure "
            f"({len(generated)} tokens; {killed} was killed mid-generation)"
        )
        echo("5. Stopping every process the demo started")
    echo(f"Done in {time.monotonic() - began:.0f} s.")
    return same

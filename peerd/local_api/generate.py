"""The Generate request: text (or token ids) in, tokens streamed back as they are chosen.

The engine (`peerd.generation`) decides; this handler only moves tensors: per step, one
worker-thread hop for the LM head, the choice and the next step's embedding, and one chain
step through the swarm.
"""

from __future__ import annotations

import torch
import trio

from peerd.generation import Generation, embed_request, last_logits
from peerd.local_api.chains import ChainFactory
from peerd.local_api.connection import ApiConnection
from peerd.local_api.generate_params import params_for_request
from peerd.models import ModelRegistry
from wire import ErrorCode, WireError
from wire import local as api


class GenerateHandler:
    def __init__(self, models: ModelRegistry, chains: ChainFactory) -> None:
        self.models = models
        self.chains = chains

    async def __call__(self, request: api.Generate, conn: ApiConnection) -> None:
        resolved = await self.models.resolve(request.model)
        local = resolved.local
        if local is None:
            raise WireError(
                ErrorCode.UNKNOWN_MODEL,
                f"to generate, this daemon needs the checkpoint directory of {resolved.model_id} "
                "(pass its path as the model)",
            )
        parts = local.parts
        try:
            params = await trio.to_thread.run_sync(params_for_request, request, local.path)
            ids = (
                request.input_ids
                if request.input_ids is not None
                else local.encode(request.prompt or "")
            )
            if not ids:
                raise ValueError("the prompt encodes to no tokens")
            gen = Generation(
                [ids], params, tokenizer=local.tokenizer, vocab_size=parts.config.vocab_size
            )
        except ValueError as exc:
            raise WireError(ErrorCode.BAD_REQUEST, str(exc)) from None
        options = self.chains.options(
            resolved.model_id,
            resolved.num_blocks,
            gen.max_length,
            batch_size=gen.rows,
            compression=request.compression,
            allow=request.allow,
            deny=request.deny,
            pad_lengths=gen.pad_lengths,
        )
        chain = self.chains.chain(options)

        def advance(out: torch.Tensor):
            """In a worker thread: LM head, pick the tokens, embed the next step's."""
            update = gen.feed(last_logits(parts, out))
            if update.next is None:
                return update.events, None, None
            return update.events, embed_request(parts, update.next).float(), update.next.reorder

        route: list[tuple[str, int, int]] = []
        try:
            await chain.open()
            first = gen.first_request()
            hidden = await trio.to_thread.run_sync(lambda: embed_request(parts, first).float())
            reorder = None
            while hidden is not None:
                out = await chain.step(hidden, reorder=reorder)
                events, hidden, reorder = await trio.to_thread.run_sync(advance, out)
                for event in events:
                    await conn.reply(api.GeneratedToken(token_id=event.token_id, text=event.text))
            route = chain.route
        finally:
            with trio.CancelScope(shield=True):
                await chain.aclose()
        result = gen.result()[0]
        await conn.reply(
            api.GenerationDone(
                token_ids=result.token_ids,
                text=result.text,
                stop_reason=result.finish_reason,
                route=route,
                recoveries=[recovery_summary(r) for r in chain.recoveries],
            )
        )


def recovery_summary(event) -> dict:
    return {
        "failed_peer": event.failed_peer,
        "reason": event.reason,
        "from_block": event.from_block,
        "replayed_tokens": event.replayed_tokens,
        "seconds": event.seconds,
    }

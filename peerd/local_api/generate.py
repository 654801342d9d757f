"""The Generate request: text (or token ids) in, tokens streamed back as they are chosen."""

from __future__ import annotations

import torch
import trio

from peerd.generation import generate_ids
from peerd.local_api.chains import ChainFactory
from peerd.local_api.connection import ApiConnection
from peerd.models import ModelRegistry
from peerd.sampling import SamplingParams
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
        params = SamplingParams(
            max_new_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            repetition_penalty=request.repetition_penalty,
            stop=tuple(request.stop),
            seed=request.seed,
        )
        try:
            ids = (
                request.input_ids
                if request.input_ids is not None
                else local.encode(request.prompt or "")
            )
        except ValueError as exc:
            raise WireError(ErrorCode.BAD_REQUEST, str(exc)) from None
        if not ids:
            raise WireError(ErrorCode.BAD_REQUEST, "the prompt encodes to no tokens")
        vocab = local.parts.config.vocab_size
        if max(ids) >= vocab:
            raise WireError(
                ErrorCode.BAD_REQUEST, f"token id {max(ids)} is outside the vocabulary ({vocab})"
            )
        options = self.chains.options(
            resolved.model_id,
            resolved.num_blocks,
            len(ids) + params.max_new_tokens,
            compression=request.compression,
            allow=request.allow,
            deny=request.deny,
        )
        chain = self.chains.chain(options)
        new_ids: list[int] = []
        text = ""
        stop_reason = "length"
        route: list[tuple[str, int, int]] = []
        try:
            await chain.open()
            async for token in generate_ids(chain, local, torch.tensor([ids]), params):
                new_ids.append(int(token[0]))
                full = local.decode(new_ids)
                piece = ""
                if not full.endswith("\ufffd"):  # hold back a character still being spelled
                    piece, text = full[len(text) :], full
                await conn.reply(api.GeneratedToken(token_id=new_ids[-1], text=piece))
                if new_ids[-1] in local.eos_token_ids:
                    stop_reason = "eos"
                    break
                if any(s and s in text for s in params.stop):
                    stop_reason = "stop"
                    break
            route = chain.route
        finally:
            with trio.CancelScope(shield=True):
                await chain.aclose()
        recoveries = [
            {
                "failed_peer": r.failed_peer,
                "reason": r.reason,
                "from_block": r.from_block,
                "replayed_tokens": r.replayed_tokens,
                "seconds": r.seconds,
            }
            for r in chain.recoveries
        ]
        await conn.reply(
            api.GenerationDone(
                token_ids=new_ids,
                text=local.decode(new_ids),
                stop_reason=stop_reason,
                route=route,
                recoveries=recoveries,
            )
        )

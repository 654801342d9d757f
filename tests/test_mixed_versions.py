"""Peers of another protocol version are refused with a clear message, on both sides (issue 9).

An "old" or "new" peer is simulated by messages with another "v" and records with another
`protocol` field, sent to and read by the code of this version.
"""

from __future__ import annotations

import time

import msgpack
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from server_harness import MODEL_ID, ServerUnderTest, ask, open_message
from tiny_models import make_tiny_model

import wire
from blocks import LoadedBlocks
from peerd.identity import peer_id_of
from peerd.records import ServerRecord, State, encode_payload, sign_record, verify_record
from peerd.server.block_server import BlockServer
from peerd.server.limits import ServerLimits
from wire import ErrorCode

OTHER_VERSION = wire.PROTOCOL_VERSION + 1
KEY = create_new_key_pair()


@pytest.fixture(scope="module")
def span(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("versions") / "llama", "llama", num_layers=2)
    return LoadedBlocks.load(path, 0, 2)


@pytest.mark.parametrize("protocol", ["inference", "rpc"])
def test_a_server_refuses_another_version_clearly_and_keeps_the_stream(span, protocol):
    async def main():
        async with trio.open_nursery() as nursery:
            h = ServerUnderTest(BlockServer(span, MODEL_ID, ServerLimits()), nursery)
            channel = h.connect(protocol=protocol)
            first = open_message(span) if protocol == "inference" else wire.Info()
            old = {**first.to_wire(), "v": OTHER_VERSION}
            await channel.write_message(old)
            raw = await channel.read_message()
            assert raw["v"] == wire.PROTOCOL_VERSION  # the refusal is readable by its sender
            reply = wire.parse_message(raw)
            assert isinstance(reply, wire.Error) and reply.code == ErrorCode.UNSUPPORTED_VERSION
            assert f"protocol version {OTHER_VERSION} is not supported" in reply.message
            assert reply.details["supported"] == sorted(wire.SUPPORTED_VERSIONS)
            assert not isinstance(await ask(channel, first), wire.Error)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_client_refuses_a_reply_of_another_version_clearly():
    reply = {**wire.Pong(nonce=3).to_wire(), "v": OTHER_VERSION}
    with pytest.raises(wire.WireError) as info:
        wire.parse_message(wire.decode_payload(wire.encode_frame(reply)[wire.HEADER_SIZE :]))
    assert info.value.code == ErrorCode.UNSUPPORTED_VERSION
    assert str(wire.PROTOCOL_VERSION) in info.value.message


def _record(**changes) -> ServerRecord:
    fields = dict(
        model_id="tiny@cafe",
        peer_id=peer_id_of(KEY),
        start=0,
        end=2,
        seq=1,
        expires_at=time.time() + 60,
    )
    return ServerRecord(**{**fields, **changes})


def test_records_carry_the_protocol_version():
    record = verify_record(sign_record(_record(), KEY))
    assert record.protocol == wire.PROTOCOL_VERSION and record.compatible and record.is_live()


def test_a_record_of_an_incompatible_version_is_valid_but_never_live():
    record = verify_record(sign_record(_record(protocol=OTHER_VERSION), KEY))
    assert not record.compatible
    assert not record.is_live()  # no chain and no balancing counts it


def test_a_record_without_the_field_is_of_the_first_version():
    payload = msgpack.unpackb(encode_payload(_record()))
    del payload["protocol"]
    assert ServerRecord.from_dict(payload).protocol == 1


def test_a_draining_server_is_not_live_for_new_sessions():
    assert not _record(state=State.DRAINING).is_live()

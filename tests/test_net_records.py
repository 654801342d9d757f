"""Server records: signing, the checks the DHT validator runs, and which copy wins."""

from __future__ import annotations

import time
from dataclasses import replace

import msgpack
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair

from peerd.identity import peer_id_of
from peerd.records import (
    MAX_RECORD_BYTES,
    MAX_TTL,
    InvalidRecord,
    RecordValidator,
    ServerRecord,
    State,
    encode_payload,
    server_key,
    sign_record,
    verify_record,
)

KEY = create_new_key_pair()
OTHER = create_new_key_pair()
PEER = peer_id_of(KEY)


def record(**changes) -> ServerRecord:
    base = ServerRecord(
        model_id="tiny-llama@0123abcd",
        peer_id=PEER,
        start=2,
        end=6,
        state=State.ONLINE,
        inference_throughput=12.5,
        forward_throughput=800.0,
        dtype="bfloat16",
        quant="nf4",
        free_cache_tokens=4096,
        using_relay=True,
        next_rtts={peer_id_of(OTHER): 0.012},
        adapters=("lora-a",),
        addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}",),
        seq=7,
        expires_at=time.time() + 60,
    )
    return replace(base, **changes)


def envelope(payload: bytes, key=KEY, sig: bytes | None = None) -> bytes:
    return msgpack.packb(
        {
            "payload": payload,
            "pubkey": key.public_key.serialize(),
            "sig": sig if sig is not None else key.private_key.sign(payload),
        },
        use_bin_type=True,
    )


def test_round_trip_keeps_every_field():
    rec = record()
    back = verify_record(sign_record(rec, KEY), key=server_key(PEER))
    assert back == rec
    assert back.model_name == "tiny-llama"


def test_payload_is_canonical():
    # keys sorted, so any implementation packing the same fields signs the same bytes
    keys = list(msgpack.unpackb(encode_payload(record())))
    assert keys == sorted(keys) and "expires_at" in keys and "seq" in keys


def test_unsigned_record_is_rejected():
    value = msgpack.packb({"payload": encode_payload(record())}, use_bin_type=True)
    with pytest.raises(InvalidRecord, match="unsigned"):
        verify_record(value)


def test_record_signed_by_another_key_is_rejected():
    # a peer signs a record that claims to be PEER's, with its own key
    with pytest.raises(InvalidRecord, match="another key"):
        verify_record(envelope(encode_payload(record()), key=OTHER))
    # ... or presents PEER's public key with its own signature
    payload = encode_payload(record())
    forged = msgpack.packb(
        {
            "payload": payload,
            "pubkey": KEY.public_key.serialize(),
            "sig": OTHER.private_key.sign(payload),
        },
        use_bin_type=True,
    )
    with pytest.raises(InvalidRecord, match="bad signature"):
        verify_record(forged)


def test_tampered_payload_is_rejected():
    value = msgpack.unpackb(sign_record(record(), KEY))
    value["payload"] = encode_payload(record(end=40))
    with pytest.raises(InvalidRecord, match="bad signature"):
        verify_record(msgpack.packb(value, use_bin_type=True))


def test_signing_someone_elses_record_is_refused():
    with pytest.raises(ValueError):
        sign_record(record(peer_id=peer_id_of(OTHER)), KEY)


def test_record_under_another_peers_key_is_rejected():
    value = sign_record(record(), KEY)
    with pytest.raises(InvalidRecord, match="another peer's key"):
        verify_record(value, key=server_key(peer_id_of(OTHER)))


def test_expired_and_immortal_records_are_rejected():
    now = time.time()
    with pytest.raises(InvalidRecord, match="expired"):
        verify_record(sign_record(record(expires_at=now - 1), KEY), now=now)
    with pytest.raises(InvalidRecord, match="longer"):
        verify_record(sign_record(record(expires_at=now + MAX_TTL + 3600), KEY), now=now)


def test_oversized_record_is_rejected():
    value = envelope(encode_payload(record()) + b"\x00" * MAX_RECORD_BYTES)
    with pytest.raises(InvalidRecord, match="cap"):
        verify_record(value)
    with pytest.raises(ValueError, match="cap"):
        sign_record(record(next_rtts={f"peer{i:04d}" + "x" * 200: 0.1 for i in range(60)}), KEY)


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"start": 5, "end": 5}, "interval"),
        ({"start": -1}, "non-negative"),
        ({"model_id": "no-fingerprint"}, "fingerprint"),
        ({"free_cache_tokens": 1.5}, "integer"),
        ({"inference_throughput": float("nan")}, "finite"),
        ({"next_rtts": {"peer": -0.1}}, "non-negative"),
        ({"state": "DANCING"}, "state"),
        ({"adapters": "not-a-list"}, "adapters"),
    ],
)
def test_malformed_fields_are_rejected(changes, reason):
    payload = record().to_dict() | changes
    with pytest.raises(InvalidRecord, match=reason):
        verify_record(envelope(msgpack.packb(payload, use_bin_type=True)))


@pytest.mark.parametrize(
    "value", [b"", b"\xc1garbage", msgpack.packb([1, 2, 3]), msgpack.packb({"payload": 3})]
)
def test_garbage_is_rejected(value):
    with pytest.raises(InvalidRecord):
        verify_record(value)


def test_validator_select_prefers_highest_valid_seq():
    v = RecordValidator()
    key = server_key(PEER)
    old, new = sign_record(record(seq=1), KEY), sign_record(record(seq=2), KEY)
    expired = sign_record(record(seq=9, expires_at=time.time() - 1), KEY)
    forged = envelope(encode_payload(record(seq=10)), key=OTHER)
    assert v.select(key, [old, new]) == 1
    assert v.select(key, [new, old]) == 0
    assert v.select(key, [expired, forged, old]) == 2
    v.validate(key, new)
    with pytest.raises(InvalidRecord):
        v.validate(key, expired)

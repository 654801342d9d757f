"""Server records: schema, canonical encoding, signing and checking. No I/O here.

A record is stored in the DHT under `server_key(peer id)` as a msgpack envelope
`{"payload": bytes, "pubkey": bytes, "sig": bytes}`. `payload` is the canonical msgpack
encoding of the record's fields (sorted keys); the signature covers exactly those bytes and the
public key must hash to the record's peer id, which must also be the one in the key. The DHT
keeps values for 24 h without a TTL of its own, so the expiry lives inside the payload and is
enforced by `RecordValidator` on every putter, storing peer and reader.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

import msgpack
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID
from libp2p.records.validator import Validator

from peerd import __version__
from wire import PROTOCOL_VERSION, SUPPORTED_VERSIONS

NAMESPACE = "peerd"
SERVER_KEY_PREFIX = f"/{NAMESPACE}/s/"
MAX_RECORD_BYTES = 8 * 1024
# A record may not claim to live longer than this (so a leaked one cannot linger for ever),
# nor expire in the past; CLOCK_SKEW forgives peers whose clocks disagree a little.
MAX_TTL = 3600.0
CLOCK_SKEW = 30.0
MAX_LIST_ITEMS = 64
MAX_TEXT = 256


class InvalidRecord(ValueError):
    """A record value that must not be stored or used; the message says why."""


class State(str, Enum):
    JOINING = "JOINING"
    ONLINE = "ONLINE"
    DRAINING = "DRAINING"  # shutting down: finishes open sessions, takes no new ones
    OFFLINE = "OFFLINE"


@dataclass(frozen=True)
class ServerRecord:
    """What one server announces: which blocks of which model it serves, and how well."""

    model_id: str  # "<name>@<checkpoint fingerprint>"
    peer_id: str
    start: int  # first block served
    end: int  # one past the last block served
    num_blocks: int = (
        0  # blocks in the whole model (0: unknown), so clients can see gaps at the end
    )
    state: State = State.ONLINE
    inference_throughput: float = 0.0  # inference steps per second through one block
    forward_throughput: float = 0.0  # forward tokens per second through one block
    dtype: str = "float32"
    quant: str = "none"
    free_cache_tokens: int = 0
    using_relay: bool = False
    next_rtts: dict[str, float] = field(default_factory=dict)  # peer id -> seconds
    adapters: tuple[str, ...] = ()  # adapters served besides the base weights (none yet)
    version: str = __version__
    # The wire protocol the server speaks (records without it predate the field: version 1);
    # a record of a version we do not speak is not live for us: no chain or balancing uses it.
    protocol: int = PROTOCOL_VERSION
    addrs: tuple[str, ...] = ()  # multiaddrs to reach this server (relayed ones included)
    seq: int = 0  # higher wins; announcers use a clock so restarts keep increasing
    expires_at: float = 0.0  # unix time

    @property
    def model_name(self) -> str:
        return self.model_id.split("@", 1)[0]

    @property
    def compatible(self) -> bool:
        """Whether we speak the server's wire protocol."""
        return self.protocol in SUPPORTED_VERSIONS

    def is_live(self, now: float | None = None) -> bool:
        """Usable for new sessions: compatible, not expired, not OFFLINE or DRAINING."""
        now = time.time() if now is None else now
        return (
            self.compatible
            and self.state not in (State.OFFLINE, State.DRAINING)
            and self.expires_at > now
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        d["adapters"] = list(self.adapters)
        d["addrs"] = list(self.addrs)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> ServerRecord:
        """Build a record from decoded msgpack, checking every field (unknown keys ignored)."""
        if not isinstance(d, dict):
            raise InvalidRecord("record payload is not a map")
        known = {f.name for f in fields(cls)}
        missing = {"model_id", "peer_id", "start", "end", "seq", "expires_at"} - d.keys()
        if missing:
            raise InvalidRecord(f"record lacks {sorted(missing)}")
        values = {k: v for k, v in d.items() if k in known}
        try:
            values["state"] = State(values.get("state", State.ONLINE.value))
        except ValueError:
            raise InvalidRecord(f"unknown state {values.get('state')!r}") from None
        values["adapters"] = tuple(_str_list(values.get("adapters", []), "adapters"))
        values["addrs"] = tuple(_str_list(values.get("addrs", []), "addrs"))
        record = cls(**values)
        record.check_fields()
        return record

    def check_fields(self) -> None:
        """Raise InvalidRecord unless every field has the right type and a sane value."""
        _text(self.model_id, "model_id")
        name, sep, fingerprint = self.model_id.partition("@")
        if not (name and sep and fingerprint):
            raise InvalidRecord(f"model_id {self.model_id!r} is not <name>@<fingerprint>")
        _text(self.peer_id, "peer_id")
        for name in ("start", "end", "num_blocks", "free_cache_tokens", "seq", "protocol"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidRecord(f"{name} must be a non-negative integer, got {value!r}")
        if not self.start < self.end <= 1_000_000:
            raise InvalidRecord(f"bad block interval [{self.start}, {self.end})")
        if self.num_blocks and self.end > self.num_blocks:
            raise InvalidRecord(
                f"block interval [{self.start}, {self.end}) beyond the model's {self.num_blocks} blocks"
            )
        for name in (
            "inference_throughput",
            "forward_throughput",
            "expires_at",
        ):
            _number(getattr(self, name), name)
        _text(self.dtype, "dtype")
        _text(self.quant, "quant")
        _text(self.version, "version")
        if not isinstance(self.using_relay, bool):
            raise InvalidRecord("using_relay must be a boolean")
        if not isinstance(self.next_rtts, dict) or len(self.next_rtts) > MAX_LIST_ITEMS:
            raise InvalidRecord(f"next_rtts must be a map of at most {MAX_LIST_ITEMS} entries")
        for peer, rtt in self.next_rtts.items():
            _text(peer, "next_rtts peer id")
            _number(rtt, "next_rtts seconds")


def server_key(peer_id: str) -> str:
    """The DHT key of a server's record: `/peerd/s/<40 hex digits of sha256(peer id)>`.

    py-libp2p's FIND_NODE handler resets the stream for keys over 50 bytes that are not a
    multihash, which breaks iterative lookups of longer keys such as the 66-byte
    `/peerd/server/<peer id>`: keep every value key at most 50 bytes.
    """
    return SERVER_KEY_PREFIX + hashlib.sha256(peer_id.encode()).hexdigest()[:40]


def encode_payload(record: ServerRecord) -> bytes:
    """Canonical bytes of a record: msgpack of its fields with sorted keys."""
    return msgpack.packb(dict(sorted(record.to_dict().items())), use_bin_type=True)


def sign_record(record: ServerRecord, key_pair: KeyPair) -> bytes:
    """The DHT value of `record`, signed with the peer's key (which must match its peer id)."""
    if ID.from_pubkey(key_pair.public_key).to_base58() != record.peer_id:
        raise ValueError("record.peer_id is not the id of the signing key")
    record.check_fields()
    payload = encode_payload(record)
    envelope = {
        "payload": payload,
        "pubkey": key_pair.public_key.serialize(),
        "sig": key_pair.private_key.sign(payload),
    }
    value = msgpack.packb(envelope, use_bin_type=True)
    if len(value) > MAX_RECORD_BYTES:
        raise ValueError(f"signed record is {len(value)} bytes, over the {MAX_RECORD_BYTES} cap")
    return value


def verify_record(
    value: bytes, *, now: float | None = None, key: str | None = None
) -> ServerRecord:
    """Decode a DHT value and check size, form, signature, key binding and expiry.

    Raises InvalidRecord with the reason; returns the record when all checks pass.
    """
    now = time.time() if now is None else now
    if not isinstance(value, (bytes, bytearray)):
        raise InvalidRecord("record value is not bytes")
    if len(value) > MAX_RECORD_BYTES:
        raise InvalidRecord(f"record is {len(value)} bytes, over the {MAX_RECORD_BYTES} cap")
    try:
        envelope = msgpack.unpackb(value, raw=False)
    except Exception as exc:
        raise InvalidRecord(f"record is not msgpack: {exc}") from None
    if not isinstance(envelope, dict):
        raise InvalidRecord("record envelope is not a map")
    payload, pubkey, sig = envelope.get("payload"), envelope.get("pubkey"), envelope.get("sig")
    if not all(isinstance(x, bytes) and x for x in (payload, pubkey, sig)):
        raise InvalidRecord("record is unsigned (payload, pubkey and sig are required)")
    try:
        public_key = deserialize_public_key(pubkey)
    except Exception as exc:
        raise InvalidRecord(f"bad public key: {exc}") from None
    try:
        body = msgpack.unpackb(payload, raw=False)
    except Exception as exc:
        raise InvalidRecord(f"payload is not msgpack: {exc}") from None
    try:
        record = ServerRecord.from_dict(body)
    except TypeError as exc:
        raise InvalidRecord(f"malformed record: {exc}") from None
    signer = ID.from_pubkey(public_key).to_base58()
    if signer != record.peer_id:
        raise InvalidRecord(f"record of {record.peer_id} is signed by another key ({signer})")
    if not public_key.verify(payload, sig):
        raise InvalidRecord("bad signature")
    if key is not None and key != server_key(record.peer_id):
        raise InvalidRecord(f"record of {record.peer_id} stored under another peer's key {key}")
    if record.expires_at <= now:
        raise InvalidRecord(f"record expired {now - record.expires_at:.1f} s ago")
    if record.expires_at > now + MAX_TTL + CLOCK_SKEW:
        raise InvalidRecord("record claims to live longer than the allowed maximum")
    return record


class RecordValidator(Validator):
    """The `/peerd/` namespace validator KadDHT runs on put, on storing peers and on get."""

    def validate(self, key: str, value: bytes) -> None:
        verify_record(value, key=key)

    def select(self, key: str, values: list[bytes]) -> int:
        """Index of the valid record with the highest seq (0 when none is valid)."""
        best, best_rank = 0, None
        for i, value in enumerate(values):
            try:
                record = verify_record(value, key=key)
            except InvalidRecord:
                continue
            rank = (record.seq, record.expires_at)
            if best_rank is None or rank > best_rank:
                best, best_rank = i, rank
        return best


def _text(value: Any, name: str) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise InvalidRecord(f"{name} must be a non-empty string of at most {MAX_TEXT} characters")


def _number(value: Any, name: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise InvalidRecord(f"{name} must be a finite non-negative number, got {value!r}")


def _str_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_LIST_ITEMS:
        raise InvalidRecord(f"{name} must be a list of at most {MAX_LIST_ITEMS} strings")
    for item in value:
        _text(item, name)
    return list(value)

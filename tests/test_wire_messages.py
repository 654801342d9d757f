"""Message schemas: round trips of every message, versioning, field validation, the registry."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import wire
from wire import (
    HEADER_SIZE,
    PROTOCOL_VERSION,
    ErrorCode,
    WireError,
    decode_payload,
    encode_frame,
    local,
    parse_message,
)


def _send_and_receive(message: wire.Message) -> wire.Message:
    frame = encode_frame(message.to_wire())
    n = wire.parse_header(frame[:HEADER_SIZE], wire.DEFAULT_MAX_FRAME)
    return parse_message(decode_payload(frame[HEADER_SIZE : HEADER_SIZE + n]))


# ---- strategies: every field over its whole valid range ------------------------------
text = st.text(min_size=1, max_size=40)
block = st.integers(0, 2**16)
counter = st.integers(0, 2**63 - 1)
float_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])


@st.composite
def hidden(draw, ndim: int = 3):
    shape = draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim))
    seed = draw(st.integers(0, 2**16))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(draw(float_dtypes))


@st.composite
def interval(draw):
    start = draw(st.integers(0, 2**16 - 1))
    return start, draw(st.integers(start + 1, 2**16))


prompts = st.none() | st.integers(1, 4).flatmap(hidden)
plain_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=10)
    | st.binary(max_size=10)
    | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
plain_map = st.dictionaries(st.text(max_size=8), plain_value, max_size=4)


def per_row(draw, batch: int, high: int) -> list[int] | None:
    """None, or one int in [0, high] per row (pad lengths, reorder indices)."""
    return draw(st.none() | st.lists(st.integers(0, high), min_size=batch, max_size=batch))


@st.composite
def backward(draw):
    start, end = draw(interval())
    h = draw(hidden())
    grad = torch.randn(h.shape).to(draw(float_dtypes))
    pads = per_row(draw, h.shape[0], 2**20)
    return wire.Backward(draw(text), start, end, h, grad, draw(prompts), "none", pads)


@st.composite
def step(draw):
    h = draw(hidden())
    reorder = per_row(draw, h.shape[0], h.shape[0] - 1) if h.shape[0] else None
    return wire.Step(
        h,
        draw(counter),
        draw(st.none() | st.integers(0, 10)),
        draw(st.none() | st.integers(11, 20)),
        draw(st.booleans()),
        reorder=reorder,
    )


@st.composite
def open_session(draw):
    start, end = draw(interval())
    batch = draw(st.integers(1, 4) | st.integers(1, 2**16))
    pads = per_row(draw, batch, 2**20) if batch <= 4 else None
    return wire.OpenSession(
        draw(text),
        start,
        end,
        draw(st.integers(1, 2**20)),
        batch,
        draw(st.sampled_from(wire.COMPRESSIONS)),
        draw(st.text(min_size=1, max_size=128)),
        pads,
    )


@st.composite
def session_opened(draw):
    start, end = draw(interval())
    return wire.SessionOpened(
        draw(text),
        start,
        end,
        draw(counter),
        max_frame=draw(st.integers(1, 2**40)),
        max_tokens=draw(st.none() | counter),
        dtype=draw(st.sampled_from(["float32", "float16", "bfloat16", "float64"])),
    )


@st.composite
def forward(draw):
    start, end = draw(interval())
    h = draw(hidden())
    pads = per_row(draw, h.shape[0], 2**20)
    return wire.Forward(draw(text), start, end, h, draw(prompts), pad_lengths=pads)


MESSAGES = {
    "open_session": open_session(),
    "session_opened": session_opened(),
    "step": step(),
    "step_result": st.builds(wire.StepResult, hidden(), counter, counter),
    "close_session": st.just(wire.CloseSession()),
    "forward": forward(),
    "forward_result": st.builds(wire.ForwardResult, hidden()),
    "backward": backward(),
    "backward_result": st.builds(wire.BackwardResult, hidden(), prompts),
    "info": st.just(wire.Info()),
    "info_result": st.builds(wire.InfoResult, plain_map, plain_map, plain_map),
    "ping": st.builds(wire.Ping, st.integers(0, 2**64 - 1)),
    "pong": st.builds(wire.Pong, st.integers(0, 2**64 - 1)),
    "error": st.builds(
        wire.Error, st.sampled_from(sorted(wire.ALL_CODES)), st.text(max_size=60), plain_map
    ),
}


def test_every_server_rpc_message_has_a_strategy():
    rpc = {name for name, cls in wire.message_types().items() if cls.__module__ == "wire.rpc"}
    assert rpc == set(MESSAGES)


@settings(max_examples=250, deadline=None)
@given(st.one_of(*MESSAGES.values()))
def test_every_message_round_trips_exactly(message):
    wire_form = message.to_wire()
    assert wire_form["v"] == PROTOCOL_VERSION and wire_form["type"] == message.TYPE
    assert _send_and_receive(message) == message


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(wire.COMPRESSIONS), hidden(), hidden())
def test_tensors_travel_with_the_messages_compression(compression, h, out):
    sent = wire.Forward("m", 0, 2, h, torch.randn(2, 3), compression)
    for tensor_map in (sent.to_wire()["hidden"], sent.to_wire()["prompts"]):
        assert tensor_map["compression"] == compression
    got = _send_and_receive(sent)
    assert got.hidden.dtype == h.dtype and got.hidden.shape == h.shape
    assert torch.allclose(got.hidden.float(), h.float(), atol=0.05, rtol=0.02)
    reply = _send_and_receive(wire.ForwardResult(out, compression=compression))
    assert reply.compression == compression and reply.hidden.shape == out.shape


def test_optional_fields_may_be_absent_on_the_wire():
    d = wire.Step(torch.zeros(1, 1, 2), 3).to_wire()
    for key in ("start", "end", "replay", "compression", "reorder"):
        assert key not in d  # left out at their defaults: a reader fills them in
    step = parse_message(d)
    assert (step.start, step.end, step.replay, step.compression) == (None, None, False, "none")
    given = wire.Step(torch.zeros(1, 1, 2), 3, start=1, end=2, replay=True, reorder=[0])
    assert parse_message(given.to_wire()) == given


def test_a_peer_of_the_previous_version_can_read_what_we_send():
    """Fields added since protocol 1 first shipped travel only when they differ from their
    defaults, so an older peer (which refuses unknown fields) reads our ordinary messages."""
    old_fields = {
        "open_session": {"model_id", "start", "end", "max_length", "batch_size", "compression", "session_id"},
        "session_opened": {"session_id", "start", "end", "free_cache_tokens"},
        "step": {"hidden", "step_id", "start", "end", "replay", "compression"},
    }  # fmt: skip
    messages = [
        wire.OpenSession(
            "m@f", 0, 2, max_length=8, batch_size=1, compression="none", session_id="s"
        ),
        wire.SessionOpened(session_id="s", start=0, end=2, free_cache_tokens=5),
        wire.Step(torch.zeros(1, 1, 2), 3),
    ]
    for message in messages:
        sent = set(message.to_wire()) - {"v", "type"}
        assert sent <= old_fields[message.TYPE], sent - old_fields[message.TYPE]


# ---- versions and dispatch -----------------------------------------------------------
def test_unsupported_version_is_its_own_error():
    d = wire.Ping(1).to_wire()
    with pytest.raises(WireError) as info:
        parse_message({**d, "v": 2})
    assert info.value.code == "unsupported_version"
    assert info.value.details == {"supported": [PROTOCOL_VERSION]}


@pytest.mark.parametrize(
    ("d", "fragment"),
    [
        ({"type": "ping", "nonce": 1}, "no protocol version"),
        ({"v": "1", "type": "ping", "nonce": 1}, "version must be an integer"),
        ({"v": True, "type": "ping", "nonce": 1}, "version must be an integer"),
        ({"v": 1, "nonce": 1}, "no 'type'"),
        ({"v": 1, "type": "pingg", "nonce": 1}, "unknown message type 'pingg'"),
        ({"v": 1, "type": 5}, "unknown message type 5"),
        ([1, "ping"], "must be a map"),
    ],
)
def test_envelope_errors(d, fragment):
    with pytest.raises(WireError) as info:
        parse_message(d)
    assert info.value.code == "bad_request" and fragment in info.value.message


# ---- field validation, on receipt and at the sender ----------------------------------
def _open(**changes) -> dict:
    d = wire.OpenSession("m", 0, 4, 128, 1, "none", "sid").to_wire()
    d.update(changes)
    return d


def _step(**changes) -> dict:
    d = wire.Step(torch.zeros(1, 2, 4), 1).to_wire()
    d.update(changes)
    return d


def _tensor(t: torch.Tensor) -> dict:
    return msgpack.unpackb(msgpack.packb(wire.encode_tensor(t)))


BAD_FIELDS = [
    (_open(start="0"), "open_session.start must be an integer"),
    (_open(start=-1), "open_session.start must be an integer in [0, 65536]"),
    (_open(end=2**16 + 1), "open_session.end must be an integer"),
    (_open(start=4, end=4), "block interval [4, 4) is empty"),
    (_open(max_length=0), "open_session.max_length"),
    (_open(batch_size=True), "open_session.batch_size"),
    (_open(compression="zstd"), "open_session.compression must be one of"),
    (_open(model_id=""), "open_session.model_id must have 1..256"),
    (_open(model_id="m" * 257), "open_session.model_id must have 1..256"),
    (_open(model_id=b"m"), "open_session.model_id must be a string"),
    (_open(session_id=None), "open_session.session_id must be a string"),
    (_open(extra=1), "open_session has unknown fields"),
    ({k: v for k, v in _open().items() if k != "end"}, "open_session misses field 'end'"),
    (_step(hidden=_tensor(torch.zeros(2, 4))), "step.hidden must have 3 dims"),
    (
        _step(hidden=_tensor(torch.zeros(1, 2, 4, dtype=torch.int64))),
        "step.hidden must have a floating",
    ),
    (_step(hidden={"dtype": "float32"}), "step.hidden: tensor map has wrong fields"),
    (_step(hidden=None), "step.hidden: a tensor must be a map"),
    (_step(step_id=-1), "step.step_id"),
    (_step(step_id=1.0), "step.step_id"),
    (_step(replay=1), "step.replay must be a boolean"),
    (_step(start=5, end=2), "block interval [5, 2) is empty"),
    (
        {
            **wire.Backward("m", 0, 1, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)).to_wire(),
            "grad_out": _tensor(torch.zeros(1, 3, 4)),
        },
        "grad_out shape (1, 3, 4) differs",
    ),
    ({**wire.InfoResult({}, {}).to_wire(), "record": [1]}, "info_result.record must be a map"),
    ({**wire.InfoResult({}, {}).to_wire(), "load": {"a": {1: 2}}}, "info_result.load.a keys must"),
    ({**wire.Ping(1).to_wire(), "nonce": 2**64}, "ping.nonce"),
    ({**wire.Error("busy", "x").to_wire(), "code": "Not A Code"}, "error.code must match"),
    ({**wire.Error("busy", "x").to_wire(), "code": ""}, "error.code must have 1..64"),
    ({**wire.CloseSession().to_wire(), "session_id": "x"}, "close_session has unknown fields"),
]


@pytest.mark.parametrize(("d", "fragment"), BAD_FIELDS, ids=[f for _, f in BAD_FIELDS])
def test_bad_fields_raise_wire_error(d, fragment):
    with pytest.raises(WireError) as info:
        parse_message(d)
    assert info.value.code == "bad_request"
    assert fragment in info.value.message


def test_invalid_messages_cannot_be_built_at_the_sender():
    with pytest.raises(WireError, match="block interval"):
        wire.Forward("m", 3, 1, torch.zeros(1, 1, 2))
    with pytest.raises(WireError, match="must be a tensor"):
        wire.Step([[[0.0]]], 1)
    with pytest.raises(WireError, match="not plain data"):
        wire.InfoResult({"t": torch.zeros(1)}, {})
    with pytest.raises(WireError, match="integer msgpack cannot carry"):
        wire.InfoResult({"n": 2**64}, {})


# ---- errors --------------------------------------------------------------------------
def test_error_messages_convert_to_and_from_exceptions():
    err = wire.Error.from_exception(WireError("cache_full", "no room", {"free": 3}))
    assert (err.code, err.message, err.details) == ("cache_full", "no room", {"free": 3})
    again = _send_and_receive(err).to_exception()
    assert isinstance(again, WireError) and (again.code, again.details) == (
        "cache_full",
        {"free": 3},
    )
    internal = wire.Error.from_exception(KeyError("x"))
    assert internal.code == ErrorCode.INTERNAL and "KeyError" in internal.message


def test_unknown_error_codes_from_newer_peers_are_accepted():
    assert parse_message(wire.Error("rate_limited", "slow down").to_wire()).code == "rate_limited"


def test_long_error_messages_are_cut_not_refused():
    err = wire.Error("internal", "x" * 10_000)
    assert len(err.message) == wire.rpc.MAX_ERROR_MESSAGE
    assert _send_and_receive(err).message == err.message


# ---- extension: new message types without touching the dispatcher --------------------
@wire.register
@dataclass(frozen=True, eq=False)
class _ListModels(wire.Message):
    TYPE: ClassVar[str] = "test_list_models"
    prefix: str = wire.wired(wire.Text(64, min_len=0), default="")
    limit: int = wire.wired(wire.Int(1, 100), default=10)


def test_registered_types_are_dispatched():
    assert _send_and_receive(_ListModels("llama", 5)) == _ListModels("llama", 5)
    with pytest.raises(WireError, match="test_list_models.limit"):
        parse_message({"v": 1, "type": "test_list_models", "limit": 0})


def test_registry_refuses_duplicates_and_fields_without_specs():
    with pytest.raises(ValueError, match="registered twice"):
        wire.register(_ListModels)

    @dataclass(frozen=True, eq=False)
    class NoSpec(wire.Message):
        TYPE: ClassVar[str] = "test_no_spec"
        x: int = 0

    with pytest.raises(TypeError, match="no wire spec"):
        wire.register(NoSpec)


def test_equality_compares_tensor_values():
    a = wire.StepResult(torch.ones(1, 1, 2), 1, 1)
    assert a == wire.StepResult(torch.ones(1, 1, 2), 1, 1)
    assert a != wire.StepResult(torch.ones(1, 1, 2).half(), 1, 1)
    assert a != wire.StepResult(torch.zeros(1, 1, 2), 1, 1)
    assert a != wire.StepResult(torch.ones(1, 1, 2), 1, 2)


def test_framing_and_tensor_free_messages_work_without_torch():
    """The light client (stdlib + msgpack) shares this codec; torch loads only for tensors."""
    step_frame = encode_frame(wire.Step(torch.zeros(1, 1, 2), 1).to_wire())
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
import wire
from wire import FrameDecoder, OpenSession, Ping, WireError, encode_frame, parse_message
sent = [Ping(7), OpenSession("m", 0, 2, 64, 1, "int8", "s"), wire.Error("busy", "later")]
maps = FrameDecoder().feed(b"".join(encode_frame(m.to_wire()) for m in sent))
assert [parse_message(d) for d in maps] == sent
try:
    parse_message(FrameDecoder().feed({step_frame!r})[0])
except WireError as exc:
    assert exc.code == "internal" and "needs torch" in exc.message, exc
else:
    raise AssertionError("a tensor was decoded without torch")
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_session_opened_from_an_older_server_gets_the_default_limits():
    d = wire.SessionOpened("s", 0, 4, 100).to_wire()
    for field in ("max_frame", "max_tokens", "dtype"):
        d.pop(field, None)
    opened = parse_message(d)
    assert (opened.max_frame, opened.max_tokens, opened.dtype) == (
        wire.DEFAULT_MAX_FRAME,
        None,
        "float32",
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda: wire.OpenSession("m", 0, 4, 128, 2, "none", "s", pad_lengths=[0]),
        lambda: wire.Step(torch.zeros(2, 1, 4), 0, reorder=[0, 1, 1]),
        lambda: wire.Step(torch.zeros(2, 1, 4), 0, reorder=[0, 2]),
        lambda: wire.Forward("m", 0, 2, torch.zeros(3, 2, 4), pad_lengths=[0, 1]),
        lambda: wire.Backward("m", 0, 2, *[torch.zeros(1, 2, 4)] * 2, pad_lengths=[0, 0]),
        lambda: local.OpenChain("m", 8, batch_size=2, pad_lengths=[1, 2, 3]),
        lambda: local.ChainStep("c", torch.zeros(2, 1, 4), reorder=[1]),
    ],
)
def test_per_row_lists_must_match_the_batch(build):
    with pytest.raises(WireError) as info:
        build()
    assert info.value.code == "bad_request"


def test_a_received_reorder_outside_the_batch_is_refused():
    d = wire.Step(torch.zeros(2, 1, 4), 0, reorder=[1, 0]).to_wire()
    d["reorder"] = [1, 5]
    with pytest.raises(WireError, match="outside the batch"):
        parse_message(d)

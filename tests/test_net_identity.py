"""Identity files, listen checks and the node's option parsing (no network)."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from peerd.config import NodeConfig
from peerd.host import ListenError, check_port_free, expand_listen_addr, listen_multiaddr
from peerd.identity import IdentityError, load_or_create_identity, peer_id_of
from peerd.node import parse_peer_addr


def test_identity_is_created_once_with_mode_0600(tmp_path):
    path = tmp_path / "home" / "identity.key"
    first = peer_id_of(load_or_create_identity(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert peer_id_of(load_or_create_identity(path)) == first
    assert first.startswith("12D3KooW")  # ed25519


def test_readable_identity_is_tightened_and_garbage_refused(tmp_path):
    path = tmp_path / "identity.key"
    first = peer_id_of(load_or_create_identity(path))
    os.chmod(path, 0o644)
    assert peer_id_of(load_or_create_identity(path)) == first
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    path.write_bytes(b"not a key")
    with pytest.raises(IdentityError):
        load_or_create_identity(path)


def test_identity_path_defaults_to_home_and_can_be_overridden(tmp_path):
    assert NodeConfig(home=tmp_path).identity_path == tmp_path / "identity.key"
    assert NodeConfig(home=tmp_path, identity=tmp_path / "k").identity_path == tmp_path / "k"
    assert NodeConfig(announce_period=5).record_ttl == 10


def test_a_port_in_use_is_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ListenError, match="another --port"):
            check_port_free("127.0.0.1", s.getsockname()[1])
    check_port_free("127.0.0.1", 0)


def test_wildcard_listen_address_expands_to_interfaces_and_loopback():
    addrs = [str(a) for a in expand_listen_addr(listen_multiaddr("0.0.0.0", 4001))]
    assert "/ip4/127.0.0.1/tcp/4001" in addrs and not any("0.0.0.0" in a for a in addrs)
    assert [str(a) for a in expand_listen_addr(listen_multiaddr("127.0.0.1", 5))] == [
        "/ip4/127.0.0.1/tcp/5"
    ]
    with pytest.raises(ValueError):
        listen_multiaddr("example.com", 1)


def test_peer_addresses_need_a_peer_id():
    from libp2p.crypto.ed25519 import create_new_key_pair

    pid = peer_id_of(create_new_key_pair())
    info = parse_peer_addr(f"/ip4/10.0.0.1/tcp/4001/p2p/{pid}")
    assert str(info.peer_id) == pid
    with pytest.raises(ValueError, match="/p2p/<peer id>"):
        parse_peer_addr("/ip4/10.0.0.1/tcp/4001")


@pytest.mark.parametrize(
    "bad", [{"reachability": "maybe"}, {"announce_period": 0}, {"port": 70000}]
)
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        NodeConfig(**bad)


def test_a_port_whose_last_connections_are_in_time_wait_is_free():
    """A daemon restarted on its --port right after it stopped (its closed connections are
    in TIME_WAIT for a minute) must be able to listen again."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as trio's listeners do
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the listening side closes first: its end goes to TIME_WAIT
        client.close()
    check_port_free("127.0.0.1", port)

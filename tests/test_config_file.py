"""`--config FILE` on `peerd serve` and `peerd join`: values apply, precedence, clear errors.

The daemons are not started: `Daemon` is replaced by a recorder of what the command built.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from libp2p.crypto.ed25519 import create_new_key_pair

import peerd.daemon
from cli.main import cli
from peerd.config import NodeConfig
from peerd.demo.tiny import TinyLlama, write_tiny_llama
from peerd.identity import peer_id_of
from peerd.server.limits import MIB, ServerLimits
from peerd.server.options import ServeOptions

PEER = f"/ip4/10.0.0.1/tcp/4001/p2p/{peer_id_of(create_new_key_pair())}"


class Built:
    """What the command handed to Daemon (set by the fake)."""

    config: NodeConfig
    socket_path: Path | None
    serve: ServeOptions | None
    max_frame: int


@pytest.fixture
def built(monkeypatch) -> Built:
    seen = Built()

    class FakeDaemon:
        def __init__(self, config, *, socket_path=None, serve=None, max_frame=None):
            seen.config, seen.socket_path, seen.serve = config, socket_path, serve
            seen.max_frame = max_frame
            self.node = None

    monkeypatch.setattr(peerd.daemon, "Daemon", FakeDaemon)
    monkeypatch.setattr("cli.serve.run_daemon", lambda daemon, level: None)
    monkeypatch.setattr("cli.join.run_daemon", lambda daemon, level: None)
    monkeypatch.delenv("PEERD_HOME", raising=False)
    monkeypatch.delenv("PEERD_INITIAL_PEERS", raising=False)
    return seen


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("m") / "tiny", TinyLlama(num_layers=2))


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "peerd.toml"
    path.write_text(text)
    return path


def test_no_options_build_the_dataclass_defaults(built, model):
    assert run("serve", model, "--new-swarm").exit_code == 0
    assert built.config == NodeConfig(new_swarm=True)
    assert built.serve == ServeOptions(model_path=model)
    assert built.max_frame == ServerLimits().max_frame and built.socket_path is None
    assert (built.serve.device, built.serve.dtype) == ("cpu", "float32")
    assert run("join", "--new-swarm").exit_code == 0
    assert built.config == NodeConfig(new_swarm=True) and built.serve is None
    assert built.max_frame == ServerLimits().max_frame


def test_file_values_apply_to_serve(built, model, tmp_path):
    config = write(
        tmp_path,
        f"""
        announce_period = 10
        cache-tokens = 4096
        initial_peers = ["{PEER}"]
        no-relay = true
        log_level = "debug"
        home = "{tmp_path / "home"}"

        [serve]
        blocks = "0:1"
        cache-mib = 512
        max-frame-mib = 8
        socket = "{tmp_path / "s.sock"}"

        [join]
        port = 5
        """,
    )
    result = run("serve", model, "--config", config)
    assert result.exit_code == 0, result.output
    assert built.config == NodeConfig(
        home=tmp_path / "home", announce_period=10.0, initial_peers=[PEER], relay=False
    )
    assert built.serve == ServeOptions(
        model_path=model,
        blocks=(0, 1),
        limits=ServerLimits(cache_tokens=4096, cache_bytes=512 * MIB, max_frame=8 * MIB),
    )
    assert built.max_frame == 8 * MIB and built.socket_path == tmp_path / "s.sock"


def test_file_values_apply_to_join_and_serve_tables_are_skipped(built, tmp_path):
    config = write(
        tmp_path,
        """
        new-swarm = true
        max_frame_mib = 2
        port = 1  # the command's own table wins
        [serve]
        cache-tokens = 1
        [join]
        port = 4321
        """,
    )
    result = run("join", "--config", config)
    assert result.exit_code == 0, result.output
    assert built.config == NodeConfig(new_swarm=True, port=4321)
    assert built.max_frame == 2 * MIB


def test_command_line_beats_environment_beats_file(built, tmp_path):
    config = write(
        tmp_path,
        f"""
        announce-period = 10
        home = "{tmp_path / "file-home"}"
        initial-peers = ["{PEER}"]
        [join]
        port = 7
        """,
    )
    assert run("join", "--config", config).exit_code == 0
    assert (built.config.home, built.config.announce_period) == (tmp_path / "file-home", 10.0)
    assert built.config.port == 7

    env = {"PEERD_HOME": str(tmp_path / "env-home")}
    result = run("join", "--config", config, "--announce-period", "20", "--port", "8", env=env)
    assert result.exit_code == 0, result.output
    assert (built.config.home, built.config.announce_period) == (tmp_path / "env-home", 20.0)
    assert built.config.port == 8
    assert built.config.initial_peers == [PEER]

    result = run("join", "--home", tmp_path / "cli-home", "--config", config, env=env)
    assert built.config.home == tmp_path / "cli-home", "the order on the command line is no matter"


def test_a_list_from_the_command_line_or_environment_replaces_the_files(built, tmp_path):
    other = f"/ip4/10.0.0.2/tcp/4001/p2p/{peer_id_of(create_new_key_pair())}"
    config = write(tmp_path, f'initial_peers = ["{PEER}"]\n')
    assert run("join", "--config", config, "--initial-peers", other).exit_code == 0
    assert built.config.initial_peers == [other]
    env = {"PEERD_INITIAL_PEERS": f"{other},{other}"}
    assert run("join", "--config", config, env=env).exit_code == 0
    assert built.config.initial_peers == [other, other]


@pytest.mark.parametrize(
    "text, message",
    [
        ("cache-token = 1", "'cache-token' is not an option of peerd serve (did you mean "),
        ("[serve]\nbogus = 1", "[serve] 'bogus' is not an option of peerd serve"),
        ('port = "80"', "port: expected an integer, got '80'"),
        ("port = 1.5", "port: expected an integer, got 1.5"),
        ("port = 70000", "port: 70000 is not in the range 0<=x<=65535"),
        ("announce_period = true", "announce_period: expected a number, got True"),
        ("new-swarm = 1", "new-swarm: expected a boolean (true or false), got 1"),
        ('initial_peers = "x"', "initial_peers: expected a list of strings, got 'x'"),
        ('reachability = "maybe"', "reachability: 'maybe' is not one of"),
        ('blocks = "2:1"', "blocks: 2:1: need 0 <= A < B"),
        (
            "[limits]\ncache-tokens = 1",
            "unknown table [limits] (a table holds the options of one command: [serve] or [join])",
        ),
        ("cache-tokens = 1\ncache_tokens = 2", "cache_tokens: that option is given twice"),
        ("port = ", "cannot read it as TOML"),
    ],
)
def test_bad_file_is_a_usage_error_naming_key_and_file(built, model, tmp_path, text, message):
    config = write(tmp_path, text + "\n")
    result = run("serve", model, "--config", config, "--new-swarm")
    assert result.exit_code == 2, result.output
    assert f"{config}: " in result.output and message in result.output
    assert not hasattr(built, "config")


def test_serve_only_option_at_the_top_level_is_for_serve_only(built, model, tmp_path):
    """One file for the daemons of a machine: join skips a top-level key only serve has."""
    config = write(tmp_path, "new-swarm = true\ncache-tokens = 4096\n")
    result = run("join", "--config", config)
    assert result.exit_code == 0, result.output
    assert built.config == NodeConfig(new_swarm=True)
    result = run("serve", str(model), "--config", config)
    assert result.exit_code == 0, result.output
    assert built.serve.limits.cache_tokens == 4096
    typo = write(tmp_path, "new-swarm = true\ncache-tokns = 4096\n")
    result = run("join", "--config", typo)
    assert result.exit_code == 2 and "'cache-tokns' is not an option of peerd join" in result.output


def test_missing_config_file(built, tmp_path):
    result = run("join", "--config", tmp_path / "nope.toml", "--new-swarm")
    assert result.exit_code == 2 and "does not exist" in result.output

"""The command line without a swarm: version, help, bench, the status table, demo checkpoint,
and the daemons' options made from dataclasses."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from cli.options import (
    dataclass_options,
    field_default,
    field_values,
    from_option,
    option_fields,
    param_name,
)
from cli.status import format_status
from peerd.config import NodeConfig
from peerd.demo.tiny import TinyLlama, write_tiny_llama
from peerd.server.limits import ServerLimits
from peerd.server.options import ServeOptions
from tests.tiny_models import load_reference


def test_version_and_help():
    runner = CliRunner()
    assert runner.invoke(cli, ["--version"]).output.startswith("peerd, version ")
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "join", "generate", "status", "sim", "bench", "demo"):
        assert command in result.output


def test_bench_measures_and_caches(tmp_path):
    model = write_tiny_llama(tmp_path / "m", TinyLlama(num_layers=2))
    runner = CliRunner()
    args = ["bench", str(model), "--blocks", "0:2", "--home", str(tmp_path / "home")]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "steps/s per block" in first.output and "(cached)" not in first.output
    second = runner.invoke(cli, args)
    assert "(cached)" in second.output
    bad = runner.invoke(
        cli, ["bench", str(model), "--blocks", "1:9", "--home", str(tmp_path / "home")]
    )
    assert bad.exit_code == 1 and "outside the model's blocks [0, 2)" in bad.output


def test_status_table_shows_coverage_and_gaps():
    server = {
        "peer_id": "12D3KooWabcdefghijklmnopqrstuv",
        "start": 0,
        "end": 3,
        "state": "ONLINE",
        "inference_throughput": 12.5,
        "forward_throughput": 900.0,
        "free_cache_tokens": 4096,
        "quant": "nf4",
        "using_relay": True,
    }
    text = format_status(
        {
            "llama@ab": {
                "num_blocks": 6,
                "coverage": [1, 1, 1, 0, 0, 0],
                "gaps": [[3, 6]],
                "servers": [server],
            }
        }
    )
    assert "coverage  111..." in text
    assert "gaps      3..5" in text
    assert "0:3" in text and "nf4" in text and "yes" in text
    assert format_status({}) == "No servers in the swarm yet."


def test_demo_checkpoint_loads_in_transformers(tmp_path):
    """The demo writes HF files by hand; transformers must read them as the same model."""
    from blocks import ClientParts, LoadedBlocks

    path = write_tiny_llama(tmp_path / "demo", TinyLlama(num_layers=3))
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    reference = load_reference(path)(ids).logits
    parts = ClientParts.load(path)
    ours = parts.logits(LoadedBlocks.load(path, 0, 3).forward(parts.embed(ids)))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


# ----- options made from dataclasses ------------------------------------------------------
OLD_SERVE_OPTIONS = (
    "--model-name --blocks --num-blocks --dtype --quant --gpu --device --socket --cache-tokens "
    "--cache-mib --max-sessions --max-tokens-per-request --max-frame-mib --step-timeout "
    "--idle-timeout --rebalance-period --home --identity --host --port --announce-addr "
    "--initial-peers --new-swarm --announce-period --no-relay --reachability --log-level"
).split()
OLD_JOIN_OPTIONS = (
    "--home --identity --host --port --announce-addr --initial-peers --new-swarm "
    "--announce-period --no-relay --reachability --log-level --socket"
).split()
OPTION_GROUPS = {  # command → the dataclasses (and which of their option fields) it offers
    "serve": [(NodeConfig, None), (ServeOptions, None), (ServerLimits, None)],
    "join": [(NodeConfig, None), (ServerLimits, ["max_frame"])],
}
CLI_ONLY = {"model", "config", "socket", "log_level", "test_record"}  # no dataclass field


@pytest.mark.parametrize(
    "name, flags",
    [
        ("serve", OLD_SERVE_OPTIONS + ["--config"]),
        ("join", OLD_JOIN_OPTIONS + ["--max-frame-mib", "--config"]),
    ],
)
def test_help_lists_every_option(name, flags):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0
    listed = set(re.findall(r"^  (--[a-z-]+)", result.output, flags=re.M))
    assert set(flags) <= listed, set(flags) - listed
    text = " ".join(result.output.split())  # help lines wrap anywhere
    assert "--announce-period FLOAT RANGE Seconds between announcements" in text
    assert "[default: 30.0; x>=0.1]" in text
    assert "[default: 64; x>=1]" in text  # --max-frame-mib: wire.DEFAULT_MAX_FRAME in MiB


@pytest.mark.parametrize("name", ["serve", "join"])
def test_option_defaults_are_the_dataclass_defaults(name):
    """Each option's default, help and environment variable are its field's, and no option
    outside the dataclasses (which could restate one of their defaults) slips in."""
    params = {p.name: p for p in cli.commands[name].params}
    for cls, only in OPTION_GROUPS[name]:
        for f in option_fields(cls, only):
            param = params.pop(param_name(f))
            assert from_option(cls, f, param.default) == field_default(f), f.name
            assert param.help == f.metadata["help"]
            assert param.envvar == f.metadata.get("envvar")
    assert set(params) <= CLI_ONLY


@dataclass
class Toy:
    count: int = field(default=3, metadata={"help": "c", "min": 1, "max": 9})
    ratio: float | None = field(default=None, metadata={"help": "r", "min": 0})
    mode: str = field(default="a", metadata={"help": "m", "choices": ("a", "b")})
    where: Path = field(default=Path("x"), metadata={"help": "w", "path": "dir"})
    tags: list[str] = field(default_factory=lambda: ["t"], metadata={"help": "t", "flag": "--tag"})
    loud: bool = field(default=False, metadata={"help": "l"})
    fast: bool = field(default=True, metadata={"help": "f", "flag": "--slow", "negate": True})
    size: int = field(default=3 * 1024, metadata={"help": "s", "flag": "--kib", "scale": 1024})
    pair: tuple[int, int] | None = field(
        default=None, metadata={"help": "p", "parse": lambda t: tuple(map(int, t.split(",")))}
    )
    hidden_field: int = 5  # no help: not an option


def toy_command(seen: list) -> click.Command:
    @click.command()
    @dataclass_options(Toy)
    def toy(**opts):
        seen.append(Toy(**field_values(Toy, opts)))

    return toy


def test_options_from_a_dataclass():
    seen: list[Toy] = []
    runner = CliRunner()
    assert runner.invoke(toy_command(seen), []).exit_code == 0
    assert seen.pop() == Toy()
    args = "--count 9 --ratio 0.5 --mode b --where d --tag u --tag v --loud --slow --kib 2"
    result = runner.invoke(toy_command(seen), args.split() + ["--pair", "1,2"])
    assert result.exit_code == 0, result.output
    assert seen.pop() == Toy(9, 0.5, "b", Path("d"), ["u", "v"], True, False, 2048, (1, 2))
    for bad in (["--count", "10"], ["--mode", "c"], ["--ratio", "-1"], ["--pair", "x"]):
        assert runner.invoke(toy_command(seen), bad).exit_code == 2
    assert "--hidden-field" not in runner.invoke(toy_command(seen), ["--help"]).output


@pytest.mark.parametrize(
    "spec, message",
    [
        (field(default=1, metadata={"help": "h", "defualt": 2}), "unknown option metadata"),
        (field(default=1, metadata={"help": "h", "choices": ("a",)}), "choices need a str"),
        (field(default=1000, metadata={"help": "h", "scale": 1024}), "not a whole number"),
    ],
)
def test_bad_option_metadata_is_refused(spec, message):
    bad = make_dataclass("Bad", [("x", int, spec)])
    with pytest.raises(TypeError, match=message):
        dataclass_options(bad)


def test_a_flag_must_default_to_off():
    bad = make_dataclass("Bad", [("on", bool, field(default=True, metadata={"help": "h"}))])
    with pytest.raises(TypeError, match="negate"):
        dataclass_options(bad)

"""The command line without a swarm: version, help, bench, the status table, demo checkpoint."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from cli.main import cli
from cli.status import format_status
from peerd.demo.tiny import TinyLlama, write_tiny_llama
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
    from blocks import ClientParts, Span

    path = write_tiny_llama(tmp_path / "demo", TinyLlama(num_layers=3))
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    reference = load_reference(path)(ids).logits
    parts = ClientParts.load(path)
    ours = parts.logits(Span.load(path, 0, 3).forward(parts.embed(ids)))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)

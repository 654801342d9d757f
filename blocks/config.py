"""Model configuration: the few numbers our block code needs, read from an HF config.json.

`load_config` turns the many spellings of HF configs (old `rope_scaling` + `rope_theta` or new
`rope_parameters`; BLOOM's `n_layer`/`n_head`/`n_embed`) into one flat frozen dataclass, and
refuses options we do not implement with `UnsupportedArchitecture` instead of computing
something subtly different from the reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnsupportedArchitecture

LLAMA_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_TYPES = (*LLAMA_TYPES, "bloom", "opt")
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `type` is one of ROPE_TYPES."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model; `family` picks the block implementation."""

    family: str  # "llama" | "bloom" | "opt"
    model_type: str  # as in config.json: llama, mistral, qwen2, bloom, opt
    num_blocks: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    max_position_embeddings: int | None = None
    qkv_bias: bool = False  # llama family: Qwen2 has q/k/v biases
    o_bias: bool = False
    mlp_bias: bool = False
    rope: RopeConfig | None = None
    sliding_window: int | None = None  # Mistral: keys older than this many positions are unseen
    residual_post_layernorm: bool = False  # BLOOM's apply_residual_connection_post_layernorm
    do_layer_norm_before: bool = True  # OPT: False means post-LN blocks (opt-350m)
    layer_norm_affine: bool = True  # OPT's layer_norm_elementwise_affine
    final_layer_norm: bool = True  # OPT checkpoints may lack the final norm
    word_embed_proj_dim: int | None = None  # OPT: embeddings narrower than hidden_size
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no config.json at {file}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from the parsed contents of an HF config.json."""
    model_type = raw.get("model_type")
    try:
        if model_type in LLAMA_TYPES:
            return _llama(raw)
        if model_type == "bloom":
            return _bloom(raw)
        if model_type == "opt":
            return _opt(raw)
    except KeyError as e:
        raise UnsupportedArchitecture(f"{model_type} config lacks the field {e}") from None
    raise UnsupportedArchitecture(
        f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)}"
    )


def _first(raw: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if raw.get(name) is not None:
            return raw[name]
    if default is None:
        raise KeyError(names[0])
    return default


def _check_act(model_type: str, act: str) -> str:
    if act not in ACTIVATIONS:
        raise UnsupportedArchitecture(f"{model_type}: activation {act!r} is not supported")
    return act


def _rope(raw: dict[str, Any]) -> RopeConfig:
    """Accept both transformers 5 `rope_parameters` and the older `rope_scaling` + `rope_theta`."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedArchitecture("per-layer-type rope parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedArchitecture(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UnsupportedArchitecture(f"partial_rotary_factor={partial} is not supported")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    return RopeConfig(
        theta=float(theta),
        type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get(
                "original_max_position_embeddings",
                raw.get(
                    "original_max_position_embeddings", raw.get("max_position_embeddings", 8192)
                ),
            )
        ),
    )


def _llama(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw["model_type"]
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    sliding = None
    if model_type == "mistral":
        sliding = raw.get("sliding_window")
    if model_type == "qwen2" and raw.get("use_sliding_window"):
        raise UnsupportedArchitecture("qwen2 with use_sliding_window=true is not supported")
    attention_bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        family="llama",
        model_type=model_type,
        num_blocks=raw["num_hidden_layers"],
        hidden_size=hidden,
        vocab_size=raw["vocab_size"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        intermediate_size=raw["intermediate_size"],
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        hidden_act=_check_act(model_type, raw.get("hidden_act", "silu")),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=raw.get("max_position_embeddings"),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        rope=_rope(raw),
        sliding_window=int(sliding) if sliding else None,
        raw=raw,
    )


def _bloom(raw: dict[str, Any]) -> ModelConfig:
    hidden = _first(raw, "hidden_size", "n_embed")
    heads = _first(raw, "n_head", "num_attention_heads")
    return ModelConfig(
        family="bloom",
        model_type="bloom",
        num_blocks=_first(raw, "n_layer", "num_hidden_layers"),
        hidden_size=hidden,
        vocab_size=raw["vocab_size"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=4 * hidden,
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        hidden_act="gelu_pytorch_tanh",
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        residual_post_layernorm=bool(raw.get("apply_residual_connection_post_layernorm", False)),
        raw=raw,
    )


def _opt(raw: dict[str, Any]) -> ModelConfig:
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    before = bool(raw.get("do_layer_norm_before", True))
    bias = bool(raw.get("enable_bias", True))
    return ModelConfig(
        family="opt",
        model_type="opt",
        num_blocks=raw["num_hidden_layers"],
        hidden_size=hidden,
        vocab_size=raw["vocab_size"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=raw["ffn_dim"],
        norm_eps=1e-5,
        hidden_act=_check_act("opt", raw.get("activation_function", "relu")),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        do_layer_norm_before=before,
        layer_norm_affine=bool(raw.get("layer_norm_elementwise_affine", True)),
        final_layer_norm=before and not raw.get("_remove_final_layer_norm", False),
        word_embed_proj_dim=raw.get("word_embed_proj_dim") or hidden,
        raw=raw,
    )

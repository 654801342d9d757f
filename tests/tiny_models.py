"""Tiny random-weight checkpoints of every supported architecture, made offline with transformers.

`make_tiny_model(dir, family, variant)` saves an HF-format checkpoint (config.json and
model.safetensors, or shards plus model.safetensors.index.json) and a byte-level BPE
tokenizer.json trained on a few sentences, and returns the directory. Weights are seeded and
scaled so that every block changes its input by O(1) (HF's default init, std 0.02, would make
blocks nearly the identity and hide bugs); norm weights and biases are random too.

    from tiny_models import make_tiny_model, load_reference  # tests/ is on sys.path under pytest
    path = make_tiny_model(tmp_path / "m", "llama", "llama3", sharded=True)
    hf_model = load_reference(path)  # the transformers model, for reference outputs
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

# (family, variant) pairs covering every architecture option we implement.
ARCHS: list[tuple[str, str | None]] = [
    ("llama", "llama2"),
    ("llama", "llama3"),
    ("mistral", None),
    ("qwen2", None),
    ("bloom", None),
    ("opt", None),
    ("opt", "350m"),
]
ARCH_IDS = [f"{family}-{variant}" if variant else family for family, variant in ARCHS]

VOCAB_SIZE = 384  # > 256 byte-level symbols + specials, so the tokenizer fits
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Peer to peer networks pool many small machines into one large one.",
    "A transformer block mixes tokens with attention and then transforms each one alone.",
    "Servers hold contiguous spans of blocks; clients keep the embeddings and the head.",
    "Hello world! Hello peers, hello GPUs, hello tokens.",
    "Large language models generate text one token at a time.",
    "Fault tolerance means replaying cached inputs to a replacement server.",
    "the of and to in is that it for on with as was at by an be this",
]


def _common(num_layers: int, hidden_size: int, num_heads: int) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    }


def tiny_config(
    family: str = "llama",
    variant: str | None = None,
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    **overrides: Any,
):
    """A transformers config object of a tiny model of the given architecture."""
    import transformers as tf

    base = _common(num_layers, hidden_size, num_heads)
    ffn = 2 * hidden_size
    if family == "llama" and variant in (None, "llama2"):
        cfg = tf.LlamaConfig(
            **base, intermediate_size=ffn, max_position_embeddings=512, tie_word_embeddings=False
        )
    elif family == "llama" and variant == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        cfg = tf.LlamaConfig(
            **base,
            intermediate_size=ffn,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=512,
            rope_parameters=rope,
            tie_word_embeddings=True,
        )
    elif family == "mistral":
        cfg = tf.MistralConfig(
            **base,
            intermediate_size=ffn,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=512,
            sliding_window=8,  # short, so that test sequences cross it
            tie_word_embeddings=False,
        )
    elif family == "qwen2":
        cfg = tf.Qwen2Config(
            **base,
            intermediate_size=ffn,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=512,
            use_sliding_window=False,
            tie_word_embeddings=True,
        )
    elif family == "bloom":
        # 6 heads (not a power of two) exercise ALiBi's interleaved extra slopes.
        heads = 6 if num_heads == 4 else num_heads
        hidden = hidden_size // heads * heads
        cfg = tf.BloomConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=hidden,
            n_layer=num_layers,
            n_head=heads,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    elif family == "opt" and variant in (None, "125m"):
        cfg = tf.OPTConfig(**base, ffn_dim=ffn, max_position_embeddings=512, dropout=0.0)
    elif family == "opt" and variant == "350m":
        cfg = tf.OPTConfig(
            **base,
            ffn_dim=ffn,
            max_position_embeddings=512,
            dropout=0.0,
            word_embed_proj_dim=hidden_size // 2,
            do_layer_norm_before=False,
        )
    else:
        raise ValueError(f"no tiny model for family={family!r} variant={variant!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """O(1) activations: unit-variance embeddings, 1/sqrt(fan_in) matrices, random norms/biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() == 1 and name.endswith("weight"):  # norm scales
                param.copy_(1.0 + 0.2 * noise)
            elif param.dim() == 1:  # biases
                param.copy_(0.1 * noise)
            elif "embed" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[1]))


def make_tokenizer(path: str | Path, vocab_size: int = 300) -> Path:
    """Train a byte-level BPE tokenizer on a few sentences and save it as path/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    out = Path(path) / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out


def make_tiny_model(
    path: str | Path,
    family: str = "llama",
    variant: str | None = None,
    sharded: bool | str = False,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """Save a tiny seeded checkpoint of `family`/`variant` (see ARCHS) into `path`; return it.

    `sharded=True` writes about one shard per block (with model.safetensors.index.json); a
    string such as "100KB" picks the shard size. Extra keyword arguments override config fields.
    """
    import transformers as tf

    path = Path(path)
    cfg = tiny_config(
        family,
        variant,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        **overrides,
    )
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    _randomize(model, seed)
    model = model.to(dtype)
    if sharded is True:
        block_bytes = sum(
            p.numel() * p.element_size()
            for n, p in model.named_parameters()
            if ".0." in n and (".layers." in n or ".h." in n)
        )
        sharded = f"{max(1, block_bytes * 11 // 10 // 1000)}KB"
    kwargs = {"max_shard_size": sharded} if sharded else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        make_tokenizer(path)
    return path


def load_reference(path: str | Path, dtype: torch.dtype = torch.float32):
    """The transformers model of a checkpoint, in eval mode (its default attention)."""
    import transformers as tf
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def reference_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM of any architecture in ARCHS."""
    for owner in ("model", "transformer"):
        body = getattr(model, owner, None)
        if body is None:
            continue
        body = getattr(body, "decoder", body)  # OPT: model.decoder.layers
        for name in ("layers", "h"):
            if hasattr(body, name):
                return getattr(body, name)
    raise ValueError(f"no decoder layers found in {type(model).__name__}")


def reference_blocks(
    model, hidden: torch.Tensor, start: int, end: int, prompts: torch.Tensor | None = None
) -> torch.Tensor:
    """Output of the transformers layers [start, end) on input `hidden` [B, T, H] (positions 0..T-1),
    adding prompts[i - start] to the first P positions before layer i (deep prompt tuning).

    The whole model runs on dummy token ids; hooks replace the input of layer `start` and record
    the output of layer `end - 1`, so the reference is transformers' own layer code. Autograd
    flows from the result to `hidden` and `prompts`.
    """
    layers = reference_layers(model)
    captured: list[torch.Tensor] = []

    def pre_hook(index: int):
        def hook(module, args, kwargs):
            h = hidden if index == start else args[0]
            if prompts is not None:
                p = prompts.shape[2]
                h = torch.cat([h[:, :p] + prompts[index - start], h[:, p:]], dim=1)
            return (h, *args[1:]), kwargs

        return hook

    def post_hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [
        layers[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True)
        for i in range(start, end)
    ]
    handles.append(layers[end - 1].register_forward_hook(post_hook))
    try:
        ids = torch.full(hidden.shape[:2], 5, dtype=torch.long, device=hidden.device)
        model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured[0]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a loaded 2-core machine torch's thread
    pool can make each op 10x slower; restored afterwards for other modules. Modules of tiny
    block tests import it (an imported autouse fixture applies to the importing module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

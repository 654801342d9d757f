"""Writing a small random-weight Llama checkpoint in HF format, without transformers.

The demo and the benchmarks need a model to serve on a machine with no model hub: this
writes config.json, model.safetensors (HF tensor names) and a byte-level BPE tokenizer.json
trained on a few sentences. The same files load in transformers (tests check that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

CORPUS = [
    "peerd pools the GPUs of many parties to run large language models.",
    "Servers hold contiguous blocks; clients keep the embeddings and the head.",
    "When a server fails, the client replays its inputs to a replacement.",
    "The quick brown fox jumps over the lazy dog.",
    "A swarm is only as fast as its slowest block.",
    "Hello world! This is a tiny model with random weights.",
]
SPECIAL = ["<unk>", "<s>", "</s>"]


@dataclass(frozen=True)
class TinyLlama:
    """Shape of the generated model (the reference benchmark setup is one such shape)."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    seed: int = 0

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        h, f = self.hidden_size, self.intermediate_size
        head_dim = h // self.num_heads
        kv = self.num_kv_heads * head_dim

        def w(rows: int, cols: int) -> torch.Tensor:
            return torch.randn(rows, cols, generator=g) * (cols**-0.5)

        def norm() -> torch.Tensor:
            return 1.0 + 0.1 * torch.randn(h, generator=g)

        out = {"model.embed_tokens.weight": torch.randn(self.vocab_size, h, generator=g)}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            out.update(
                {
                    p + "input_layernorm.weight": norm(),
                    p + "self_attn.q_proj.weight": w(h, h),
                    p + "self_attn.k_proj.weight": w(kv, h),
                    p + "self_attn.v_proj.weight": w(kv, h),
                    p + "self_attn.o_proj.weight": w(h, h),
                    p + "post_attention_layernorm.weight": norm(),
                    p + "mlp.gate_proj.weight": w(f, h),
                    p + "mlp.up_proj.weight": w(f, h),
                    p + "mlp.down_proj.weight": w(h, f),
                }
            )
        out["model.norm.weight"] = norm()
        out["lm_head.weight"] = w(self.vocab_size, h)
        return {k: v.contiguous() for k, v in out.items()}


def write_tokenizer(path: Path, vocab_size: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    out = path / "tokenizer.json"
    tok.save(str(out))
    return out


def write_tiny_llama(path: str | Path, shape: TinyLlama = TinyLlama()) -> Path:
    """Write the checkpoint into `path` (created) and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(shape.config(), indent=1))
    save_file(shape.tensors(), str(path / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(path, shape.vocab_size)
    return path

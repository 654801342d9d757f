"""A short digest that identifies a checkpoint's weights, for DHT records.

Two servers announcing the same model name must hold the same weights, or a client chaining
them would get garbage. The digest covers the config (minus fields that only record who saved
it), every tensor's name, dtype and shape, and every tensor's bytes. Tensors are hashed one by
one in name order, so the same weights sharded differently give the same fingerprint.
Hashing a large model takes minutes, so results are cached by (file paths, sizes, mtimes).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .checkpoint import INDEX_FILE, Checkpoint
from .errors import CheckpointError

VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype")
_memo: dict[str, str] = {}


def checkpoint_fingerprint(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """32 hex digits (blake2b-128) over config, tensor names/dtypes/shapes and tensor bytes."""
    path = Path(path).resolve()
    ckpt = Checkpoint(path)
    files = [path / "config.json", *ckpt.files()]
    if (path / INDEX_FILE).exists():
        files.append(path / INDEX_FILE)
    key = _stat_key(files)
    if key in _memo:
        return _memo[key]
    cached = Path(cache_dir) / f"fingerprint-{key}.json" if cache_dir is not None else None
    if cached is not None and cached.exists():
        try:
            _memo[key] = json.loads(cached.read_text())["fingerprint"]
            return _memo[key]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is recomputed and rewritten
    digest = _compute(path, ckpt)
    _memo[key] = digest
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"path": str(path), "fingerprint": digest}))
        os.replace(tmp, cached)
    return digest


def _stat_key(files: list[Path]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for file in files:
        try:
            st = file.stat()
        except FileNotFoundError:
            raise CheckpointError(
                f"{file} is missing; the fingerprint needs the whole checkpoint"
            ) from None
        h.update(f"{file}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _compute(path: Path, ckpt: Checkpoint) -> str:
    config = json.loads((path / "config.json").read_text())
    for k in VOLATILE_CONFIG_KEYS:
        config.pop(k, None)
    # One digest per tensor, read one at a time, each file opened once; combined in name order.
    tensor_digests: dict[str, bytes] = {}
    for name, tensor in ckpt.iter_tensors(sorted(ckpt.weight_map)):
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{name}\0{str(tensor.dtype)}\0{tuple(tensor.shape)}\0".encode())
        h.update(_tensor_bytes(tensor))
        tensor_digests[name] = h.digest()
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(config, sort_keys=True).encode())
    for name in sorted(tensor_digests):
        h.update(tensor_digests[name])
    return h.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())

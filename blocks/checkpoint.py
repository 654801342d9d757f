"""Reading selected tensors of an HF safetensors checkpoint, opening only the files that hold them.

A sharded checkpoint's `model.safetensors.index.json` maps every tensor name to its shard, so the
names are known without touching a shard; a single-file checkpoint's names come from its header.
A server that holds blocks 10..20 of a 70B model thus never opens (nor needs on disk) the shards
of the other blocks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError, MissingTensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """Tensor names -> files of one checkpoint directory; `read` opens each needed file once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"cannot read the shard index {index}: {e}") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: weight_map is not an object")
            return {str(k): str(v) for k, v in weight_map.items()}
        single = self.path / SINGLE_FILE
        if single.exists():
            with self._open(single) as f:
                return dict.fromkeys(f.keys(), SINGLE_FILE)
        raise CheckpointError(
            f"no {SINGLE_FILE} or {INDEX_FILE} in {self.path} (only safetensors checkpoints are read)"
        )

    def files(self) -> list[Path]:
        """Every weight file of the checkpoint, sorted by name."""
        return [self.path / name for name in sorted(set(self.weight_map.values()))]

    def names(self) -> set[str]:
        return set(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def base_prefix(self, candidates: tuple[str, ...], layers: str) -> str:
        """The first candidate prefix under which the checkpoint has blocks (`{base}{layers}.`)."""
        for base in candidates:
            marker = f"{base}{layers}."
            if any(name.startswith(marker) for name in self.weight_map):
                return base
        raise MissingTensor(
            f"no block tensors in {self.path}: expected names starting with "
            + " or ".join(repr(f"{b}{layers}.") for b in candidates)
        )

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Load the named tensors (on CPU, in their stored dtype); MissingTensor names the first absent one."""
        return dict(self.iter_tensors(names))

    def iter_tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time, grouped by file, each needed file opened once."""
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise MissingTensor(
                f"tensor {missing[0]!r} is not in the checkpoint {self.path}"
                + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
            )
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        for file, file_names in sorted(by_file.items()):
            with self._open(self.path / file) as f:
                for name in file_names:
                    try:
                        tensor = f.get_tensor(name)
                    except SafetensorError as e:
                        raise MissingTensor(f"cannot read {name!r} from {file}: {e}") from None
                    yield name, tensor

    @staticmethod
    def _open(file: Path):
        if not file.exists():
            raise CheckpointError(f"weight file {file} is missing")
        try:
            return safe_open(str(file), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot open {file}: {e}") from None


def fresh_copy(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Copy into newly allocated memory of `dtype`.

    Tensors read from safetensors may sit at any 8-byte offset of the file; unaligned weights made
    fp32 matmuls ~1.5x slower here. torch's allocator aligns to 64 bytes.
    """
    return torch.empty(tensor.shape, dtype=dtype).copy_(tensor)

"""Which module implements a config's family. Each family module exposes the same names:
Block, Positions, Client, BASE_PREFIXES and LAYERS."""

from __future__ import annotations

from types import ModuleType

from . import bloom, llama, opt
from .config import ModelConfig
from .errors import UnsupportedArchitecture

FAMILIES: dict[str, ModuleType] = {"llama": llama, "bloom": bloom, "opt": opt}


def family_of(config: ModelConfig) -> ModuleType:
    try:
        return FAMILIES[config.family]
    except KeyError:
        raise UnsupportedArchitecture(
            f"no block implementation for family {config.family!r}"
        ) from None

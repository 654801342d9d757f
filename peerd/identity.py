"""The daemon's persistent ed25519 identity: one key file (mode 0600) keeps the peer id stable."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.identity_utils import load_identity, save_identity
from libp2p.peer.id import ID

log = logging.getLogger("peerd.identity")


class IdentityError(RuntimeError):
    """The identity file exists but cannot be used."""


def load_or_create_identity(path: Path) -> KeyPair:
    """Load the key at `path`, or create a fresh ed25519 key there (mode 0600) on first start.

    A key that others may read is tightened to 0600 with a warning rather than refused: the
    daemon keeps working and the next `ls -l` shows the fix.
    """
    path = Path(path).expanduser()
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("identity %s had mode %o; restricting it to 0600", path, mode)
            os.chmod(path, 0o600)
        try:
            key_pair = load_identity(path)
        except ValueError as exc:
            raise IdentityError(f"cannot read identity key {path}: {exc}") from exc
        log.debug("loaded identity %s from %s", peer_id_of(key_pair), path)
        return key_pair
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pair = create_new_key_pair()
    save_identity(key_pair, path)
    log.info("created a new identity %s in %s", peer_id_of(key_pair), path)
    return key_pair


def peer_id_of(key_pair: KeyPair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()

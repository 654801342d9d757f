"""peerd: the daemon (libp2p host, DHT records, serving, inference chains, local socket API)."""

__version__ = "0.1.0"

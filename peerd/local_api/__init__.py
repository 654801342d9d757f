"""The daemon's local Unix-socket API (see server.py); handlers live one concept per module."""

from peerd.local_api.server import LocalAPI

__all__ = ["LocalAPI"]

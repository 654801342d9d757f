"""The light client library: standard library and msgpack only at import time."""

"""A structural pre-check of msgpack bytes, run before msgpack builds any Python object.

Why: msgpack-python allocates a list or dict as soon as it reads a container header, sized by
the *declared* length, and nests up to 1024 levels deep. A 5 KB frame of nested array headers
made it allocate ~33 MB here before failing; a 64 MiB frame could ask for hundreds of GiB.
msgpack has per-container length limits but no depth or object-count limit, so this walk
checks what msgpack cannot: every declared length is backed by bytes actually present,
nesting depth and total object count are capped, no ext types (msgpack's timestamp ext
included) and no trailing bytes after the one top-level object. It reads only headers and
skips string/binary bodies, so a frame of a few large tensors costs a few microseconds.
"""

from __future__ import annotations

from .errors import bad_request

MAX_DEPTH = 32
"""Deepest nesting of arrays/maps accepted (a message is a map of maps, 3-4 levels)."""

MAX_OBJECTS = 100_000
"""Most msgpack objects in one frame; caps Python memory and CPU spent on one frame."""

# first byte -> (number of bytes holding a length, "str"/"bin" body, "array"/"map" children)
_SIZED = {
    0xC4: (1, "body"),
    0xC5: (2, "body"),
    0xC6: (4, "body"),
    0xD9: (1, "body"),
    0xDA: (2, "body"),
    0xDB: (4, "body"),
    0xDC: (2, "array"),
    0xDD: (4, "array"),
    0xDE: (2, "map"),
    0xDF: (4, "map"),
}
# first byte -> bytes of payload after it, for fixed-width scalars
_FIXED = {
    0xC0: 0,  # nil
    0xC2: 0,  # false
    0xC3: 0,  # true
    0xCA: 4,  # float 32
    0xCB: 8,  # float 64
    0xCC: 1,
    0xCD: 2,
    0xCE: 4,
    0xCF: 8,  # uint 8..64
    0xD0: 1,
    0xD1: 2,
    0xD2: 4,
    0xD3: 8,  # int 8..64
}
_EXT = frozenset({0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})


def check_msgpack(buf: bytes | bytearray | memoryview) -> None:
    """Raise WireError unless `buf` holds exactly one well-formed, bounded msgpack object."""
    view = byte_view(buf)
    size = len(view)
    if size == 0:
        raise bad_request("empty payload")
    pos = 0
    objects = 0
    # pending[i] = objects still expected inside the i-th open container
    pending: list[int] = []
    while True:
        if pos >= size:
            raise bad_request("truncated msgpack: input ends inside an object")
        objects += 1
        if objects > MAX_OBJECTS:
            raise bad_request(f"more than {MAX_OBJECTS} msgpack objects in one frame")
        first = view[pos]
        pos += 1
        children = 0
        if first <= 0x7F or first >= 0xE0:  # positive / negative fixint
            pass
        elif first <= 0x8F:  # fixmap
            children = 2 * (first & 0x0F)
        elif first <= 0x9F:  # fixarray
            children = first & 0x0F
        elif first <= 0xBF:  # fixstr
            pos += first & 0x1F
        elif first in _FIXED:
            pos += _FIXED[first]
        elif first in _SIZED:
            width, kind = _SIZED[first]
            if pos + width > size:
                raise bad_request("truncated msgpack: length field cut short")
            length = int.from_bytes(view[pos : pos + width], "big")
            pos += width
            if kind == "body":
                pos += length
            else:
                children = 2 * length if kind == "map" else length
        elif first in _EXT:
            raise bad_request("msgpack extension types are not accepted")
        else:  # 0xC1, never used by msgpack
            raise bad_request(f"invalid msgpack type byte 0x{first:02x}")
        if pos > size:
            raise bad_request("truncated msgpack: declared length exceeds the frame")
        if children:
            # every child takes at least one byte: refuse lengths the frame cannot back
            if children > size - pos:
                raise bad_request("msgpack container declares more items than the frame holds")
            if len(pending) >= MAX_DEPTH:
                raise bad_request(f"msgpack nesting deeper than {MAX_DEPTH}")
            pending.append(children)
            continue
        # one object finished: close every container it completes
        while pending:
            pending[-1] -= 1
            if pending[-1]:
                break
            pending.pop()
        if not pending:
            break
    if pos != size:
        raise bad_request(f"{size - pos} trailing bytes after the msgpack object")


def byte_view(buf: object) -> memoryview:
    """`buf` as a flat memoryview of bytes (any contiguous buffer), or WireError."""
    try:
        view = memoryview(buf)  # type: ignore[arg-type]
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except TypeError as exc:
        raise bad_request(f"payload must be a contiguous bytes-like buffer: {exc}") from None

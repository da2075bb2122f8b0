"""Bounds on what a detector's headers may cost before they are decoded (PROTOCOL.md § Limits,
reused: ``max_header_values``, ``max_header_bytes``, the wire's ``MAX_DEPTH``).

A Stream V2 message is one CBOR item; cbor2 builds a Python object for every value in it, under
the interpreter lock, before any field is read. A start message of 4 MiB of one-byte values
took the source's receiving thread 5.8 s of CPU (the limit on one message is
``max_message_bytes``, 512 MiB: minutes, and gigabytes of objects), and one nested 390 deep was
taken whole into the scan's metadata. :func:`check_cbor` walks the message's item heads — no
object built, string bodies skipped — and refuses it, naming the limit, as soon as it holds
more values than ``max_header_values`` or nests maps and arrays deeper than ``MAX_DEPTH``: at
most that many steps, whatever the message's size; a reference to a value built before (CBOR
tags 25, 28, 29, 256, which cbor2 decodes) is refused: no DECTRIS message uses one. Byte
strings (an image's compressed channel, a pixel mask) count as one value each, so a start with
its masks and flatfield passes however large they are. Stream V1 headers are JSON parts: :func:`load_json` refuses one larger
than ``max_header_bytes`` (real ones are a few kB; pixel data travel in binary parts, never
parsed) and names one nested past the JSON decoder's recursion limit (a RecursionError raised
out of the receiving thread stopped the daemon).
"""

from __future__ import annotations

import json
from typing import Any

from ..limits import Limits
from ..wire import MAX_DEPTH
from .schema import DecodeError

#: the limits of a decoder not given the daemon's own (worker processes, the bridge)
DEFAULT_LIMITS = Limits()
_ARGUMENT_BYTES = {24: 1, 25: 2, 26: 4, 27: 8}
#: tags cbor2 decodes into references to a value built before (RFC 8949 value sharing, the
#: stringref extension): no DECTRIS message uses them, and a reference counts one value here
#: however large what it stands for: a 6-byte array holding itself raised RecursionError out of
#: the receiving thread (the daemon stopped), shared arrays ~8 bytes a level expand to 2^levels
_REFERENCE_TAGS = {25: "a string reference", 28: "a shared value", 29: "a reference to a shared value",
                   256: "a string reference namespace"}


def check_cbor(data: bytes | memoryview, max_values: int, max_depth: int = MAX_DEPTH,
               what: str = "Stream V2 message") -> None:
    """Raise :class:`DecodeError` when the CBOR item in ``data`` holds more than ``max_values``
    values (maps, arrays, tags, strings, numbers; a string's chunks each) or nests maps and
    arrays deeper than ``max_depth``. A malformed or truncated item is left for the decoder to
    name (this returns where it cannot go on)."""
    n = len(data)
    pos = values = depth = 0
    # per open item: values it still takes (-1: until a break), whether it is a map or array
    stack: list[list[Any]] = [[1, False]]
    while stack:
        top = stack[-1]
        if top[0] == 0:
            stack.pop()
            depth -= top[1]
            continue
        if pos >= n:
            return
        head = data[pos]
        pos += 1
        if head == 0xFF:  # the break of an indefinite-length item
            if top[0] != -1:
                return
            stack.pop()
            depth -= top[1]
            continue
        if top[0] > 0:
            top[0] -= 1
        values += 1
        if values > max_values:
            raise DecodeError(f"the {what} holds more than {max_values} values (maps, arrays, strings, "
                              f"numbers): the limit max_header_values")
        major, info = head >> 5, head & 31
        if info < 24:
            arg: int | None = info
        elif info in _ARGUMENT_BYTES:
            size = _ARGUMENT_BYTES[info]
            arg = int.from_bytes(data[pos:pos + size], "big")
            pos += size
        elif info == 31 and major in (2, 3, 4, 5):
            arg = None
        else:
            return
        if major in (2, 3):
            if arg is None:
                stack.append([-1, False])  # its chunks, each a string of the same type
            else:
                pos += arg
        elif major in (4, 5):
            count = -1 if arg is None else arg * (2 if major == 5 else 1)
            if count:
                depth += 1
                if depth > max_depth:
                    raise DecodeError(f"the {what} nests maps and arrays deeper than {max_depth} levels: "
                                      "the limit max_depth")
                stack.append([count, True])
        elif major == 6:
            if arg in _REFERENCE_TAGS:
                raise DecodeError(f"the {what} uses CBOR tag {arg} ({_REFERENCE_TAGS[arg]}): values shared or "
                                  "referenced are not in a detector's messages (a reference can make a cycle, or "
                                  "repeat a value without bound)")
            stack.append([1, False])  # the tagged item


def load_json(part: bytes, limits: Limits = DEFAULT_LIMITS, what: str = "Stream V1 header part") -> Any:
    """``part`` as JSON, or :class:`DecodeError` naming why not: larger than ``max_header_bytes``,
    nested past the decoder's recursion limit, or not JSON."""
    if len(part) > limits.max_header_bytes:
        raise DecodeError(f"the {what} is {len(part)} bytes, more than the limit max_header_bytes "
                          f"({limits.max_header_bytes})")
    try:
        return json.loads(part)
    except RecursionError:
        raise DecodeError(f"the {what} nests JSON too deep to decode") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"the {what} is not JSON: {exc}") from None

"""Deliberate stream faults for tests and drills: drop, duplicate, reorder, corrupt.

A :class:`Faults` instance is a Producer hook (``Producer(hook=Faults(drop=0.1))``, or
``cryoptycho replay --drop 0.1``). It acts on encoded messages, i.e. on exactly what the wire
carries, and records what it did in ``stats`` so a test can check the receiver's counts.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from .messages import Message
from .wire import byte_view

#: ways to corrupt a message; each is caught by a different receiver rule
CORRUPTIONS = (
    "header",  # garbage header bytes          → header / msgpack (or known_type)
    "truncate",  # last part loses its tail      → arrays[i].nbytes / size_match (or decompress)
    "drop_part",  # last part missing            → message / part_count
    "flip",  # one payload byte flipped          → arrays[i].crc32 / checksum (only with checksums)
)


class Faults:
    """Randomly drop, duplicate, reorder (swap with the next message) or corrupt messages.

    Probabilities are per message of the ``types`` listed (frames only by default, so the scan
    itself still opens and closes); draws come from ``seed``, so a run is reproducible.
    """

    def __init__(
        self,
        drop: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        corrupt: float = 0.0,
        corruptions: tuple[str, ...] = ("header", "truncate", "drop_part"),
        types: tuple[str, ...] = ("frames",),
        seed: int = 0,
    ) -> None:
        for name, p in (
            ("drop", drop),
            ("duplicate", duplicate),
            ("reorder", reorder),
            ("corrupt", corrupt),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} probability must lie in [0, 1], got {p}")
        unknown = set(corruptions) - set(CORRUPTIONS)
        if unknown or not corruptions:
            raise ValueError(
                f"corruptions must be a non-empty subset of {CORRUPTIONS}, got {corruptions}"
            )
        self.drop, self.duplicate, self.reorder, self.corrupt = drop, duplicate, reorder, corrupt
        self.corruptions = tuple(corruptions)
        self.types = tuple(types)
        self.rng = np.random.default_rng(seed)
        self.stats: Counter[str] = Counter()
        #: frame indices of frames messages dropped or corrupted (never delivered intact)
        self.lost_indices: list[int] = []
        self._held: list[Any] | None = None

    def process(self, msg: Message, parts: list[Any]) -> list[list[Any]]:
        """The messages to send in place of ``msg`` (none, one, or several)."""
        if msg.type not in self.types:
            return [*self.flush(), parts]
        out: list[list[Any]] = []
        r = self.rng.random(4)
        if r[0] < self.drop:
            self.stats["dropped"] += 1
            self._lose(msg)
            return out
        if r[1] < self.corrupt:
            parts = self._corrupt(parts)
            self._lose(msg)
        copies = [parts, list(parts)] if r[2] < self.duplicate else [parts]
        if len(copies) == 2:
            self.stats["duplicated"] += 1
        if self._held is not None:
            # the held message goes out after this one: the two are swapped
            out.extend(copies)
            out.append(self._held)
            self._held = None
        elif r[3] < self.reorder:
            self.stats["reordered"] += 1
            self._held = copies[0]
            out.extend(copies[1:])
        else:
            out.extend(copies)
        return out

    def flush(self) -> list[list[Any]]:
        """Release a held-back message (before a message the hook does not reorder)."""
        held, self._held = self._held, None
        return [] if held is None else [held]

    def _lose(self, msg: Message) -> None:
        indices = getattr(msg, "indices", None)
        if indices is not None:
            self.lost_indices.extend(int(i) for i in np.asarray(indices))

    def _corrupt(self, parts: list[Any]) -> list[Any]:
        kind = self.corruptions[int(self.rng.integers(len(self.corruptions)))]
        self.stats[f"corrupt_{kind}"] += 1
        parts = list(parts)
        if kind == "header":
            parts[0] = self.rng.bytes(max(1, byte_view(parts[0]).nbytes // 2))
        elif kind == "drop_part" and len(parts) > 1:
            parts.pop()
        elif kind in ("truncate", "flip") and len(parts) > 1:
            tail = bytearray(byte_view(parts[-1]))
            if kind == "truncate":
                del tail[len(tail) // 2 :]
            elif tail:
                tail[int(self.rng.integers(len(tail)))] ^= 0xFF
            parts[-1] = bytes(tail)
        return parts

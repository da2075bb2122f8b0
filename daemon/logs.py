"""Logging setup for the service: human-readable text or JSON lines (one object per line).

Extra context passed as ``logger.info("...", extra={"scan_id": ...})`` appears as JSON fields, so
log shippers can filter by scan without parsing messages.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any, TextIO

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC ISO 8601), level, logger, msg, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "thread": record.threadName,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s [%(threadName)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
        if extras:
            text += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return text


def setup_logging(fmt: str = "text", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Configure the root logger once (replacing handlers set by an earlier call)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


#: items one pass of per-item log lines names at most (a stop's report, a start's look at the
#: spool directory, a pass over the pending raw copies), the rest counted in one line: 5,000
#: pending raw copies with 3 kB paths made one stop and the failed retries write 146 MB of log
LOG_ITEMS_MAX = 20
#: characters of the names one log line lists at most (its first name is kept whatever its size)
LOG_NAMES_CHARS = 8192


def named(items: Iterable[str], most: int = LOG_ITEMS_MAX, chars: int = LOG_NAMES_CHARS) -> str:
    """``items`` joined with ", ", at most ``most`` of them and ``chars`` characters, then
    "… and N more" (the total counted, the rest not formatted)."""
    shown: list[str] = []
    size = left = 0
    for item in items:
        if left or len(shown) >= most or (shown and size + len(item) > chars):
            left += 1
            continue
        shown.append(item)
        size += len(item) + 2
    return ", ".join(shown) + (f" … and {left} more" if left else "")


class Bounded:
    """The per-item log lines of one pass: the first ``most`` go out as they are, the others
    are counted (by a short cause the caller gives) for :meth:`summary`'s one line."""

    def __init__(self, logger: logging.Logger, most: int = LOG_ITEMS_MAX) -> None:
        self.logger, self.most = logger, most
        self.logged = 0
        self.left: Counter[str] = Counter()

    def log(self, level: int, cause: str, msg: str, *args: Any, **kwargs: Any) -> None:
        if self.logged < self.most:
            self.logged += 1
            self.logger.log(level, msg, *args, **kwargs)
        else:
            self.left[cause if len(cause) <= 200 else cause[:199] + "…"] += 1

    def summary(self, level: int, what: str, then: str = "") -> None:
        """One line for the items not logged one by one: ``what`` names them ("raw copies
        failed"), ``then`` what becomes of them."""
        if not self.left:
            return
        causes = "; ".join(f"{n} × {cause}" for cause, n in self.left.most_common(LOG_ITEMS_MAX))
        more = len(self.left) - LOG_ITEMS_MAX
        self.logger.log(level, "%d more %s, not logged one by one (after the first %d): %s%s%s",
                        sum(self.left.values()), what, self.most, causes,
                        f"; and {more} other causes" if more > 0 else "", f"; {then}" if then else "")
        self.left.clear()

"""systemd ``Type=notify`` support: READY=1, WATCHDOG=1, STOPPING=1, STATUS=… over $NOTIFY_SOCKET.

The protocol is one datagram per notification on a Unix socket; no dependency needed.
"""

from __future__ import annotations

import os
import socket
import time


class SystemdNotifier:
    """Sends notifications when started under systemd (``$NOTIFY_SOCKET`` set); otherwise a no-op."""

    def __init__(self) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET") or None
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        watchdog_for_us = usec is not None and (pid is None or pid == str(os.getpid()))
        #: half the watchdog period, as systemd recommends; None = no watchdog requested
        self.watchdog_interval_s = int(usec) / 2e6 if watchdog_for_us and usec else None
        self._last_watchdog = 0.0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, state: str) -> bool:
        """Send ``state`` (e.g. "READY=1"); True if a datagram was sent."""
        if self.address is None:
            return False
        address = self.address
        if address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True

    def ready(self, status: str = "") -> None:
        self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def watchdog(self) -> None:
        """Ping the watchdog if due; call this from the main loop only (proves the loop turns)."""
        if self.watchdog_interval_s is None:
            return
        now = time.monotonic()
        if now - self._last_watchdog >= self.watchdog_interval_s:
            self._last_watchdog = now
            self.notify("WATCHDOG=1")

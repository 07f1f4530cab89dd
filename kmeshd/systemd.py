"""sd_notify through sdnotify: start-up status, READY, watchdog, reload, stop.

Every call is a no-op outside systemd (no NOTIFY_SOCKET), so the daemon calls them
unconditionally.
"""

from __future__ import annotations

import os
import time


class Notifier:
    def __init__(self) -> None:
        env = os.environ  # sdnotify reads NOTIFY_SOCKET from there too
        self._enabled = bool(env.get("NOTIFY_SOCKET"))
        usec = int(env.get("WATCHDOG_USEC", "0") or 0)
        # Ping at half the watchdog period, as sd_watchdog_enabled(3) advises.
        self._watchdog_every = usec / 2e6 if usec else 0.0
        self._last_ping = 0.0
        self._sd = None
        if self._enabled:
            import sdnotify  # type: ignore[import-not-found,unused-ignore]

            self._sd = sdnotify.SystemdNotifier()

    def _send(self, message: str) -> None:
        if self._sd is not None:
            self._sd.notify(message)

    def status(self, text: str) -> None:
        self._send(f"STATUS={text}")

    def extend_timeout(self, seconds: float) -> None:
        self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def ready(self, text: str) -> None:
        self._send(f"READY=1\nSTATUS={text}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """Called from the main loop: a ping proves the loop still turns."""
        if not self._watchdog_every:
            return
        now = time.monotonic()
        if now - self._last_ping >= self._watchdog_every:
            self._last_ping = now
            self._send("WATCHDOG=1")

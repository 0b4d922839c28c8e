"""A small single-threaded event loop for paho clients: sockets, timers, thread-safe calls.

paho-mqtt's external-loop API (``on_socket_open/close/register_write/unregister_write``,
``loop_read``, ``loop_write``, ``loop_misc``) lets one thread serve many clients: one agent on a
Raspberry Pi, or hundreds of simulated devices in the fleet simulator, without a thread per
client. Everything an agent does (MQTT callbacks, telemetry, renewal) runs on its reactor's thread,
so agent state needs no locks; other threads talk to it only through :meth:`call_soon_threadsafe`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["FileLike", "Reactor", "Timer"]

log = logging.getLogger("iotauth.agent")


class FileLike(Protocol):
    def fileno(self) -> int: ...


class Timer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


SocketHandler = Callable[[bool, bool], None]  # (readable, writable)


class Reactor:
    """``run()`` until ``stop()``; all registered callbacks run on the thread that runs it."""

    def __init__(self, *, name: str = "iotauth-agent") -> None:
        self.name = name
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._pending: list[Callable[[], object]] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self.thread: threading.Thread | None = None

    # -- scheduling ----------------------------------------------------------------------------

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        with self._lock:
            self._pending.append(callback)
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    # -- sockets -------------------------------------------------------------------------------

    def add_socket(self, sock: FileLike, handler: SocketHandler, *, write: bool = False) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        try:
            self._selector.register(sock, events, handler)
        except KeyError:
            self._selector.modify(sock, events, handler)

    def want_write(self, sock: FileLike, write: bool) -> None:
        try:
            key = self._selector.get_key(sock)
        except (KeyError, ValueError):
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        if key.events != events:
            self._selector.modify(sock, events, key.data)

    def remove_socket(self, sock: FileLike) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    # -- running -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to return (from any thread)."""
        self._stopping = True
        self.call_soon_threadsafe(lambda: None)

    def start_thread(self) -> threading.Thread:
        self.thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self.thread.start()
        return self.thread

    def run(self) -> None:
        self._stopping = False
        while not self._stopping:
            self._run_once()
        self._run_pending()

    def _run_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for callback in pending:
            self._guard(callback)

    def _run_once(self) -> None:
        timeout = 1.0
        if self._pending:
            timeout = 0.0
        elif self._timers:
            timeout = min(timeout, max(0.0, self._timers[0][0] - time.monotonic()))
        for key, mask in self._selector.select(timeout):
            if key.data is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                continue
            handler: SocketHandler = key.data
            readable, writable = (
                bool(mask & selectors.EVENT_READ),
                bool(mask & selectors.EVENT_WRITE),
            )
            try:
                handler(readable, writable)
            except Exception:
                log.exception("unexpected error in the agent loop")
        self._run_pending()
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._guard(timer.callback)

    def _guard(self, callback: Callable[[], object]) -> None:
        try:
            callback()
        except Exception:
            # One misbehaving client or timer must not take the others (or the device) down.
            log.exception("unexpected error in the agent loop")

    def close(self) -> None:
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

"""Counters and gauges in the Prometheus text format, served by a tiny asyncio HTTP endpoint.

No dependency: the exposition format is a few lines of text, and the broker only needs counters
and gauges. ``GET /metrics`` returns them; anything else is 404.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

__all__ = ["Metrics", "serve_metrics"]

_HELP = {
    "iotauth_broker_connections": ("gauge", "MQTT connections that completed CONNECT"),
    "iotauth_broker_handshakes_in_progress": ("gauge", "TLS handshakes in flight"),
    "iotauth_broker_connects_total": ("counter", "Accepted CONNECTs"),
    "iotauth_broker_refusals_total": ("counter", "Refused connections, by reason"),
    "iotauth_broker_authentications_total": (
        "counter",
        "Identities proven at CONNECT, by method (mtls, jwt, password, oidc)",
    ),
    "iotauth_broker_acl_denials_total": ("counter", "ACL denials, by action"),
    "iotauth_broker_kicks_total": ("counter", "Sessions closed by the broker, by reason"),
    "iotauth_broker_messages_in_total": ("counter", "PUBLISH packets accepted from clients"),
    "iotauth_broker_messages_out_total": ("counter", "PUBLISH packets written to clients"),
    "iotauth_broker_outbound_dropped_total": ("counter", "Messages dropped for slow subscribers"),
    "iotauth_broker_offline_dropped_total": ("counter", "Messages dropped, offline queue full"),
    "iotauth_broker_backpressure_holds_total": (
        "counter",
        "Times a publisher was not read because a receiver of its messages was behind",
    ),
    "iotauth_broker_backpressure_stuck_total": (
        "counter",
        "Receivers that stayed behind past backpressure_timeout (their excess is dropped)",
    ),
    "iotauth_broker_crl_number": ("gauge", "Number of the CRL in force"),
    "iotauth_broker_crl_next_update_seconds": ("gauge", "Seconds until the CRL's nextUpdate"),
}

Labels = tuple[tuple[str, str], ...]


class Metrics:
    def __init__(self) -> None:
        self._values: dict[str, dict[Labels, float]] = collections.defaultdict(dict)
        self._gauges: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._values[name]
        series[key] = series.get(key, 0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self._values[name][tuple(sorted(labels.items()))] = value

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """A gauge read when scraped (connections, CRL age)."""
        self._gauges[name] = read

    def value(self, name: str, **labels: str) -> float:
        if name in self._gauges and not labels:
            return self._gauges[name]()
        return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0)

    def render(self) -> str:
        lines: list[str] = []
        names = sorted(set(self._values) | set(self._gauges))
        for name in names:
            kind, text = _HELP.get(name, ("untyped", name))
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if name in self._gauges:
                lines.append(f"{name} {self._gauges[name]():g}")
                continue
            for labels, value in sorted(self._values[name].items()):
                rendered = ",".join(f'{k}="{v}"' for k, v in labels)
                lines.append(f"{name}{{{rendered}}} {value:g}" if rendered else f"{name} {value:g}")
        return "\n".join(lines) + "\n"


async def serve_metrics(metrics: Metrics, host: str, port: int) -> asyncio.Server:
    """Start ``GET /metrics`` on host:port; the caller closes the returned server."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if path == b"/metrics":
                body, status = metrics.render().encode(), b"200 OK"
                ctype = b"text/plain; version=0.0.4"
            else:
                body, status, ctype = b"not found\n", b"404 Not Found", b"text/plain"
            writer.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: "
                + ctype
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a scraper that hangs up or sends junk gets nothing
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)

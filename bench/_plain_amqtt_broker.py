"""Plain amqtt 0.12.1 with a TLS listener that requires a client certificate: the reference.

    .venv/bin/python bench/_plain_amqtt_broker.py --pki DIR --port P

Started by ``bench/broker_bench.py``; this is "what amqtt gives you" once its one mTLS gap is
closed. amqtt builds the listener's SSLContext in the static ``Broker._create_ssl_context`` with
``CERT_OPTIONAL``; the subclass below sets ``CERT_REQUIRED`` and TLS >= 1.2 and changes nothing
else. No CRL (amqtt has no setting for one), no identity binding, no ACL: the only plugin is
``AnonymousAuthPlugin`` (no ``$SYS`` publisher, no event or packet logger). Certificates come from
an iotauth PKI directory: ``root.crt`` (trust anchor), ``server.crt`` (leaf + issuing CA) and
``private/server.key``.

Prints ``READY <port> <pid>`` on stdout once listening; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

from amqtt.broker import Broker


class MutualTLSBroker(Broker):  # type: ignore[misc]  # amqtt is untyped for mypy
    """amqtt's broker, except that its TLS listener demands a CA-signed client certificate."""

    @staticmethod
    def _create_ssl_context(listener: Any) -> ssl.SSLContext:  # noqa: ANN401 - amqtt's type
        ctx: ssl.SSLContext = Broker._create_ssl_context(listener)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


def build_config(pki: Path, host: str, port: int) -> dict[str, Any]:
    listener = {
        "type": "tcp",
        "bind": f"{host}:{port}",
        "ssl": True,
        "max_connections": -1,
        "cafile": str(pki / "root.crt"),
        "certfile": str(pki / "server.crt"),
        "keyfile": str(pki / "private" / "server.key"),
    }
    plugins = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    return {"listeners": {"default": listener}, "plugins": plugins}


async def serve(pki: Path, host: str, port: int) -> None:
    broker = MutualTLSBroker(build_config(pki, host, port))
    await broker.start()
    print(f"READY {port} {os.getpid()}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    with contextlib.suppress(Exception):  # best effort on the way out
        await asyncio.wait_for(broker.shutdown(), 10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pki", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="ERROR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    asyncio.run(serve(args.pki, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

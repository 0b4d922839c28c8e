"""The agent's TLS handshake with a file key next to the same handshake with a TPM key.

    .venv/bin/python bench/tpm_handshake.py [--handshakes 50] [--tpm TCTI]

Starts our broker in-process on 127.0.0.1:0 and, unless ``--tpm`` names a real TPM (on a Pi:
``device:/dev/tpmrm0``), a software TPM (swtpm) on free ports in a temporary directory. Two
devices: one issued with a file key (``device.key`` PEM), one provisioned over a pty from a
virtual device whose key the TPM made (``device.key`` is the TPM's wrapped blob). Each handshake
is what the agent does when it connects: TCP connect, TLS with the context that
``provisioning.tls`` builds from the credential directory (the agent's own), client certificate
verified by the broker. The two kinds alternate, so both see the same machine at the same time.
Also measured: building that context (the TPM key is loaded once to check it belongs to the TPM
and to the certificate) and one TPM2_Sign alone (a session: connect, load, sign, flush).
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from broker import BrokerSettings
from broker.server import BrokerThread
from hardware.emulator import VirtualDevice
from hardware.keygen import TpmBackend
from hardware.tpm import TCTI_ENV, Tpm
from iotauth.testing import SoftTpm
from provisioning.pki import PKI
from provisioning.station import provision
from provisioning.tls import client_context_for_credentials


def _handshake(ctx: ssl.SSLContext, port: int) -> Callable[[], None]:
    def once() -> None:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle stall
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                # TLS 1.3: the client's certificate and signature go with its Finished; reading
                # the broker's first record proves it accepted them (it closes otherwise).
                tls.settimeout(5)
                tls.sendall(b"\x10\x00")  # a malformed CONNECT: the broker answers by closing
                tls.recv(1)

    return once


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def _summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[max(0, int(len(ordered) * 0.9) - 1)]
    return f"{statistics.median(ordered):.1f} | {p90:.1f}"


def run(tcti: str, root: Path, handshakes: int) -> list[str]:
    os.environ[TCTI_ENV] = tcti  # what the agent reads; the credential directory says "tpm"
    pki = PKI.init(root / "pki", trust_domain="fleet.example")
    try:
        pki.issue("dev-file", out=root / "dev-file")
        store = root / "dev-tpm"
        with VirtualDevice(store, "pty", backend=TpmBackend(tcti)) as device:
            result = provision(pki, device.address, device_id="dev-tpm")
        assert result.ok, result.reason
        with BrokerThread(BrokerSettings(pki.path), audit_sink=lambda _: None) as broker:
            dirs = {"file key": root / "dev-file", "TPM key": store}
            build: dict[str, list[float]] = {name: [] for name in dirs}
            shake: dict[str, list[float]] = {name: [] for name in dirs}
            once: dict[str, Callable[[], None]] = {}
            for name, path in dirs.items():
                for _ in range(5):
                    build[name].append(
                        _timed(functools.partial(client_context_for_credentials, path))
                    )
                once[name] = _handshake(client_context_for_credentials(path), broker.port)
                once[name]()  # warm-up: imports, first connection
            for _ in range(handshakes):
                for name in dirs:
                    shake[name].append(_timed(once[name]))
        tpm = Tpm(tcti)
        blob = (store / "device.key").read_bytes()
        sign = [_timed(lambda: tpm.sign_digest(blob, b"\x01" * 32)) for _ in range(handshakes)]
    finally:
        pki.close()
    lines = [
        f"TPM: `{tcti}`; {handshakes} handshakes per key, alternating; TLS 1.3, P-256.",
        "",
        "| | median ms | p90 ms |",
        "| --- | ---: | ---: |",
    ]
    for name in dirs:
        lines.append(f"| handshake, {name} | {_summary(shake[name])} |")
    for name in dirs:
        lines.append(f"| build the agent's context, {name} | {_summary(build[name])} |")
    lines.append(f"| one TPM2_Sign (session: connect, load, sign, flush) | {_summary(sign)} |")
    extra = statistics.median(shake["TPM key"]) - statistics.median(shake["file key"])
    lines += ["", f"The TPM key adds {extra:.1f} ms to the median handshake."]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handshakes", type=int, default=50)
    parser.add_argument("--tpm", help="a real TPM's TCTI (default: start a swtpm)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tpm-bench-") as tmp:
        root = Path(tmp)
        if args.tpm:
            lines = run(args.tpm, root, args.handshakes)
        else:
            try:
                with SoftTpm(root / "swtpm") as soft:
                    lines = run(soft.tcti, root, args.handshakes)
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

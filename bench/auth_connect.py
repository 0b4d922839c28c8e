"""Broker CPU per connect for each authentication method, next to mutual TLS in the same run.

    .venv/bin/python bench/auth_connect.py [--devices 300] [--rounds 3] [--concurrency 20]

One ``iotauth broker run`` process with one listener per method (``--listen P1:mtls --listen P2:jwt
--listen P3:password --listen P4:oidc --listen P5:scram``). Each round, every device connects once
over mutual TLS (its certificate in the handshake) and once with a device token
(server-authenticated TLS, the token as the MQTT password; each token is signed beforehand and used
once, since the broker refuses a replayed ``jti``), and as many services connect once with their
secret as the MQTT password and once with an identity provider's access token (RS256, from a JWKS
file; one fresh token per connect). Each connect is a full TLS handshake (no resumption), CONNECT,
CONNACK, DISCONNECT. The broker's CPU is read from /proc before and after each batch; the figure is
the median over rounds of CPU ms per connect.

What dominates is measured in this process, on the same machine: the server's side of a TLS
handshake with and without a client certificate (memory BIOs, no sockets), the broker's token
check alone (``DeviceTokenAuthenticator.authenticate``: the x5c certificate's issuer signature and
the token's signature, two ECDSA P-256 verifications), the password check alone
(``check_secret``: PBKDF2-HMAC-SHA-256 over the verifier's iteration count, as the password method
must derive the key from what the client sent) and the access-token check alone
(``OIDCAuthenticator.authenticate``: one RS256 verification, the JWKS already cached).

``scram``: services connect over server-authenticated TLS with SCRAM-SHA-256 in MQTT 5 enhanced
authentication (CONNECT, AUTH, AUTH, CONNACK) with the same secrets as ``password``. The client's
PBKDF2 (4096 iterations) runs in this process, never in the broker; the broker's side of the
exchange alone is measured here too (``ScramAuthenticator``: two steps over the stored keys).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import secrets
import signal
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import jwt as pyjwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from scramp import ScramClient

from broker import mqtt
from broker.auth import ConnectionFacts
from broker.auth_jwt import DeviceTokenAuthenticator
from broker.auth_oidc import OIDCAuthenticator, OIDCSettings
from broker.auth_scram import MECHANISM, ScramAuthenticator
from provisioning.identity import IdentityKind
from provisioning.keyfiles import load_private_key
from provisioning.pki import PKI
from provisioning.registry import SecretRecord
from provisioning.service_secrets import check_secret
from provisioning.tls import client_context, server_context_for_pki
from provisioning.tokens import make_device_token

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# One listener each, measured in this order every round; password, oidc and scram are for services.
METHODS = ("mtls", "jwt", "password", "oidc", "scram")
ISSUER, AUDIENCE = "https://idp.bench.example", "mqtt-bench"


def _utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _varlen(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, password: str | None) -> bytes:
    flags = 0x02  # clean session
    payload = _utf8(client_id)
    if password is not None:
        flags |= 0xC0  # user name (the service name for password; jwt and oidc ignore it)
        payload += _utf8(client_id) + _utf8(password)
    body = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", 30) + payload
    return bytes([0x10]) + _varlen(len(body)) + body


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def one_connect(port: int, ctx: ssl.SSLContext, client_id: str, password: str | None) -> None:
    reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx)
    writer.write(connect_packet(client_id, password))
    connack = await asyncio.wait_for(reader.readexactly(4), 10)
    if connack[3] != 0:
        msg = f"{client_id}: CONNACK {connack[3]}"
        raise RuntimeError(msg)
    writer.write(b"\xe0\x00")
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def scram_connect(port: int, ctx: ssl.SSLContext, name: str, secret: str | None) -> None:
    """CONNECT (client-first), AUTH (server-first), AUTH (client-final), CONNACK (server-final,
    checked), DISCONNECT: MQTT 5 enhanced authentication with SCRAM-SHA-256."""
    reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx)
    client = ScramClient([MECHANISM], name, secret or "")
    packets = mqtt.ClientPacketReader(1 << 16, 5)

    async def read() -> mqtt.Packet:
        while True:
            got = packets.feed(await asyncio.wait_for(reader.read(4096), 10))
            if got:
                return got[0]

    def data(text: str) -> mqtt.Properties:
        return mqtt.Properties(authentication_method=MECHANISM, authentication_data=text.encode())

    connect = mqtt.Connect(5, name, True, 30, properties=data(client.get_client_first()))
    writer.write(mqtt.encode_connect(connect))
    first = await read()
    assert isinstance(first, mqtt.Auth), first
    client.set_server_first(bytes(first.properties.authentication_data or b"").decode())
    final = data(client.get_client_final())
    writer.write(mqtt.auth5(mqtt.Reason.CONTINUE_AUTHENTICATION, final, from_client=True))
    connack = await read()
    if not isinstance(connack, mqtt.Connack) or connack.reason_code:
        msg = f"{name}: {connack}"
        raise RuntimeError(msg)
    client.set_server_final(bytes(connack.properties.authentication_data or b"").decode())
    writer.write(mqtt.disconnect5(from_client=True))
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def batch(
    port: int,
    jobs: list[tuple[ssl.SSLContext, str, str | None]],
    concurrency: int,
    connect: Callable[[int, ssl.SSLContext, str, str | None], Awaitable[None]] = one_connect,
) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def run(job: tuple[ssl.SSLContext, str, str | None]) -> None:
        async with gate:
            await connect(port, *job)

    await asyncio.gather(*(run(job) for job in jobs))


def handshake_server_ms(pki_dir: Path, client: ssl.SSLContext, mode: str, n: int = 200) -> float:
    """Server-side CPU of one full handshake, in memory, for a client-certificate mode."""
    server = server_context_for_pki(pki_dir, client_certificates=mode)  # type: ignore[arg-type]
    spent = 0.0
    for _ in range(n):
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        cli = client.wrap_bio(c_in, c_out, server_hostname="localhost")
        srv = server.wrap_bio(s_in, s_out, server_side=True)
        done_c = done_s = False
        while not (done_c and done_s):
            if not done_c:
                try:
                    cli.do_handshake()
                    done_c = True
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            t0 = time.process_time()
            if not done_s:
                try:
                    srv.do_handshake()
                    done_s = True
                except ssl.SSLWantReadError:
                    pass
            spent += time.process_time() - t0
            c_in.write(s_out.read())
    return spent / n * 1e3


class Devices:
    """A scratch PKI with ``count`` devices (their TLS contexts, keys and certificates) and as
    many services with a secret each, and an identity provider's RS256 key in a JWKS file."""

    def __init__(self, root: Path, count: int) -> None:
        self.pki = PKI.init(root / "pki", trust_domain="bench.example")
        self.names = [f"dev-{i}" for i in range(count)]
        creds = {n: root / "creds" / n for n in self.names}
        self.pki.issue_many(
            self.names, kind=IdentityKind.DEVICE, out_dirs=[creds[n] for n in self.names]
        )
        self.mtls = {
            n: client_context(
                trust=creds[n] / "ca.crt",
                cert_chain=creds[n] / "device.crt",
                key=creds[n] / "device.key",
            )
            for n in self.names
        }
        self.server_only = client_context(trust=self.pki.path / "root.crt")
        for ctx in [*self.mtls.values(), self.server_only]:
            ctx.options |= ssl.OP_NO_TICKET  # every connect a full handshake
        self.keys = {n: load_private_key(creds[n] / "device.key") for n in self.names}
        self.certs = {
            n: x509.load_pem_x509_certificate((creds[n] / "device.crt").read_bytes())
            for n in self.names
        }
        self.services = {n: f"svc-{i}" for i, n in enumerate(self.names)}
        self.secrets = {s: self.pki.set_service_secret(s)[0] for s in self.services.values()}
        self.idp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = pyjwt.algorithms.RSAAlgorithm.to_jwk(self.idp_key.public_key(), as_dict=True)
        self.jwks = root / "jwks.json"
        self.jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256"}]}))
        self.oidc = OIDCSettings(issuer=ISSUER, audience=AUDIENCE, jwks=str(self.jwks))

    def access_token(self, service: str) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": service, "iat": now, "exp": now + 600,
                  "jti": secrets.token_hex(8)}  # fmt: skip
        return pyjwt.encode(claims, self.idp_key, algorithm="RS256", headers={"kid": "k1"})

    def tokens(self, names: list[str] | None = None) -> list[tuple[str, str]]:
        """A fresh token per device (the broker refuses a replayed jti)."""
        return [
            (n, make_device_token(
                key=self.keys[n], certificate=self.certs[n], device_id=n, audience="bench.example"
            ))
            for n in names or self.names
        ]  # fmt: skip

    def jobs(self, method: str, names: list[str]) -> list[tuple[ssl.SSLContext, str, str | None]]:
        if method == "mtls":
            return [(self.mtls[n], n, None) for n in names]
        services = [self.services[n] for n in names]
        if method in ("password", "scram"):
            return [(self.server_only, s, self.secrets[s]) for s in services]
        if method == "oidc":
            return [(self.server_only, s, self.access_token(s)) for s in services]
        return [(self.server_only, n, token) for n, token in self.tokens(names)]


def measure(devices: Devices, rounds: int, concurrency: int) -> dict[str, list[float]]:
    """Broker CPU ms per connect, per method, per round, from one broker process."""
    exe = Path(sys.executable).with_name("iotauth")
    listen = [arg for method in METHODS for arg in ("--listen", f"0:{method}")]
    listen += ["--max-connections", "1000", "--no-persist"]
    oidc = ["--oidc-issuer", ISSUER, "--oidc-audience", AUDIENCE, "--oidc-jwks", str(devices.jwks)]
    proc = subprocess.Popen(
        [str(exe), "broker", "run", "--pki", str(devices.pki.path), "--no-renewal", *listen, *oidc],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        banner = proc.stderr.readline()
        found = {m: int(p) for p, m in re.findall(r":(\d+) \((\w+)\)", banner)}
        if set(found) != set(METHODS):
            msg = f"the broker did not start: {banner.strip()}"
            raise RuntimeError(msg)
        warm = devices.names[:concurrency]  # lazy imports and cold caches, not timed
        connects = {"scram": scram_connect}
        for method in METHODS:
            connect = connects.get(method, one_connect)
            asyncio.run(batch(found[method], devices.jobs(method, warm), 10, connect))
        per: dict[str, list[float]] = {method: [] for method in METHODS}
        for r in range(rounds):
            for method in METHODS:
                jobs = devices.jobs(method, devices.names)
                connect = connects.get(method, one_connect)
                before = cpu_seconds(proc.pid)
                asyncio.run(batch(found[method], jobs, concurrency, connect))
                per[method].append((cpu_seconds(proc.pid) - before) / len(jobs) * 1e3)
                print(f"round {r + 1} {method}: {per[method][-1]:.2f} ms", file=sys.stderr)
        return per
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)


def token_check_ms(devices: Devices) -> tuple[float, float]:
    """The broker's token check alone: a certificate's first token, and a later one."""
    auth = DeviceTokenAuthenticator(
        trust_domain="bench.example",
        issuers=lambda: [devices.pki.issuing],
        is_revoked=lambda _: False,
    )

    async def run(signed: list[tuple[str, str]]) -> float:
        t0 = time.process_time()
        for name, token in signed:
            await auth.authenticate(ConnectionFacts(name, "device", token, "bench", None))
        return (time.process_time() - t0) / len(signed) * 1e3

    first = asyncio.run(run(devices.tokens()))
    return first, asyncio.run(run(devices.tokens()))


def password_check_ms(devices: Devices, n: int = 50) -> float:
    """The password method's check alone: PBKDF2 of the password, then one comparison."""
    pairs = list(devices.secrets.items())[:n]
    records = [devices.pki.service_secret(name) for name, _ in pairs]
    t0 = time.process_time()
    for record, (_, secret) in zip(records, pairs, strict=True):
        assert record is not None
        assert check_secret(record, secret)
    return (time.process_time() - t0) / len(pairs) * 1e3


def access_token_check_ms(devices: Devices) -> float:
    """The oidc method's check alone (JWKS cached): one RS256 verification and the claims."""

    async def active(_name: str) -> bool:
        return True

    auth = OIDCAuthenticator(devices.oidc, trust_domain="bench.example", service_active=active)
    signed = [(s, devices.access_token(s)) for s in devices.services.values()]

    async def run() -> float:
        await auth.authenticate(ConnectionFacts(signed[0][0], None, signed[0][1], "bench", None))
        t0 = time.process_time()
        for name, token in signed:
            await auth.authenticate(ConnectionFacts(name, None, token, "bench", None))
        return (time.process_time() - t0) / len(signed) * 1e3

    return asyncio.run(run())


def scram_server_ms(devices: Devices, n: int = 300) -> tuple[float, float]:
    """The broker's side of a SCRAM exchange alone (both steps, stored keys only), and the
    client's side (its PBKDF2 of the secret) for comparison."""
    name, secret = next(iter(devices.secrets.items()))
    record = devices.pki.service_secret(name)

    async def lookup(_name: str) -> SecretRecord | None:
        return record

    auth = ScramAuthenticator(trust_domain="bench.example", secret=lookup)
    facts = ConnectionFacts(name, None, None, "127.0.0.1:1", None)

    async def run() -> tuple[float, float]:
        server = client = 0.0
        for _ in range(n):
            scram = ScramClient([MECHANISM], name, secret)
            t0 = time.process_time()
            exchange = auth.begin(MECHANISM, facts)
            first = await exchange.step(scram.get_client_first().encode())
            t1 = time.process_time()
            scram.set_server_first(bytes(first.data or b"").decode())
            final = scram.get_client_final().encode()
            t2 = time.process_time()
            done = await exchange.step(final)
            t3 = time.process_time()
            assert done.authenticated is not None
            server += (t1 - t0) + (t3 - t2)
            client += t2 - t1
        return server / n * 1e3, client / n * 1e3

    return asyncio.run(run())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="iotauth-auth-bench-") as tmp:
        devices = Devices(Path(tmp), args.devices)
        try:
            per = measure(devices, args.rounds, args.concurrency)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        first = devices.names[0]
        mutual = handshake_server_ms(devices.pki.path, devices.mtls[first], "required")
        server_auth = handshake_server_ms(devices.pki.path, devices.server_only, "none")
        first_ms, again_ms = token_check_ms(devices)
        password_ms, oidc_ms = password_check_ms(devices), access_token_check_ms(devices)
        scram_ms, scram_client_ms = scram_server_ms(devices)
        devices.pki.close()
    median = {method: statistics.median(values) for method, values in per.items()}
    mtls = median["mtls"]
    print(f"{args.devices} devices, {args.rounds} rounds, {args.concurrency} connects at a time;")
    print(f"{dt.date.today()}, Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}.")
    print()
    print("| method | broker CPU per connect (median of rounds) | vs mutual TLS |")
    print("|---|---:|---:|")
    labels = {
        "mtls": "mutual TLS (`mtls`)",
        "jwt": "device token (`jwt`)",
        "password": "service secret as password (`password`)",
        "oidc": "identity-provider token (`oidc`)",
        "scram": "SCRAM-SHA-256 (`scram`, MQTT 5 AUTH)",
    }
    for method, ms in median.items():
        print(f"| {labels.get(method, method)} | {ms:.2f} ms | {ms / mtls:.2f}x |")
    print()
    print("Where it goes (server side, measured in this process):")
    print()
    print("| piece | CPU |")
    print("|---|---:|")
    print(f"| TLS handshake, client certificate verified | {mutual:.2f} ms |")
    print(f"| TLS handshake, server-authenticated only | {server_auth:.2f} ms |")
    print(f"| token check, a certificate's first token (x5c chain too) | {first_ms:.2f} ms |")
    print(f"| token check, later tokens (x5c chain cached per certificate) | {again_ms:.2f} ms |")
    print(f"| password check (PBKDF2-HMAC-SHA-256, 4096 iterations) | {password_ms:.2f} ms |")
    print(f"| access-token check (one RS256 verification, JWKS cached) | {oidc_ms:.2f} ms |")
    print(f"| SCRAM exchange, broker side (two steps, stored keys) | {scram_ms:.3f} ms |")
    print(f"| SCRAM proof, client side (PBKDF2, 4096 iterations) | {scram_client_ms:.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

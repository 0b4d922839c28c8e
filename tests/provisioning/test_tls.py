"""Real TLS handshakes on 127.0.0.1 with provisioning.tls contexts, and their failing twins."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from hardware.keygen import TpmBackend
from provisioning.errors import PassphraseError, PKIError
from provisioning.identity import IdentityKind
from provisioning.pki import PKI
from provisioning.tls import (
    check_client_credentials,
    client_context,
    client_context_for_credentials,
    keystore_for_credentials,
    server_context_for_pki,
)


class Outcome:
    def __init__(self) -> None:
        self.server_error: BaseException | None = None
        self.client_error: BaseException | None = None
        self.peer_uri: str | None = None


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, *, host: str = "localhost"
) -> Outcome:
    """One connection; both sides exchange a byte so TLS 1.3's late client-cert errors surface."""
    outcome = Outcome()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                cert = tls.getpeercert()
                sans = cert.get("subjectAltName", ()) if cert else ()
                outcome.peer_uri = next((v for k, v in sans if k == "URI"), None)  # type: ignore[misc]
                tls.sendall(tls.recv(1))
        except (ssl.SSLError, OSError) as exc:
            outcome.server_error = exc
        finally:
            conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(b"x")
            if tls.recv(1) != b"x":
                outcome.client_error = ConnectionError("connection closed by the server")
    except (ssl.SSLError, OSError) as exc:
        outcome.client_error = exc
    thread.join(10)
    listener.close()
    return outcome


@pytest.fixture
def server_ctx(pki: PKI, pki_dir: Path) -> ssl.SSLContext:
    return server_context_for_pki(pki_dir)


def test_issued_device_connects_and_is_identified(
    pki: PKI, pki_dir: Path, tmp_path: Path, server_ctx: ssl.SSLContext
) -> None:
    pki.issue("dev-1", out=tmp_path / "dev-1")
    outcome = handshake(server_ctx, client_context_for_credentials(tmp_path / "dev-1"))
    assert outcome.server_error is None
    assert outcome.client_error is None
    assert outcome.peer_uri == "spiffe://fleet.example/device/dev-1"
    # And over the IP SAN, since devices are often pointed at an address.
    ip = handshake(server_ctx, client_context_for_credentials(tmp_path / "dev-1"), host="127.0.0.1")
    assert ip.server_error is None
    assert ip.client_error is None


def test_service_identity_connects(
    pki: PKI, pki_dir: Path, tmp_path: Path, server_ctx: ssl.SSLContext
) -> None:
    pki.issue("sink", kind=IdentityKind.SERVICE, out=tmp_path / "sink")
    outcome = handshake(server_ctx, client_context_for_credentials(tmp_path / "sink"))
    assert outcome.server_error is None
    assert outcome.peer_uri == "spiffe://fleet.example/service/sink"


def test_client_without_certificate_is_refused(
    pki: PKI, pki_dir: Path, server_ctx: ssl.SSLContext
) -> None:
    outcome = handshake(server_ctx, client_context(trust=pki_dir / "root.crt"))
    assert outcome.server_error is not None
    assert "certificate" in str(outcome.server_error).lower()
    assert outcome.peer_uri is None


def test_foreign_ca_is_refused(
    pki: PKI, foreign_pki: PKI, pki_dir: Path, tmp_path: Path, server_ctx: ssl.SSLContext
) -> None:
    """Same trust domain name, different root: refused as an unknown CA."""
    foreign_pki.issue("dev-1", out=tmp_path / "foreign")
    ctx = client_context(
        trust=pki_dir / "root.crt",
        cert_chain=tmp_path / "foreign" / "device.crt",
        key=tmp_path / "foreign" / "device.key",
    )
    outcome = handshake(server_ctx, ctx)
    assert "unable to get local issuer certificate" in str(outcome.server_error)


def test_expired_certificate_is_refused(
    pki: PKI, pki_dir: Path, tmp_path: Path, server_ctx: ssl.SSLContext
) -> None:
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    pki.issue("dev-old", out=tmp_path / "old", now=long_ago, days=1)
    outcome = handshake(server_ctx, client_context_for_credentials(tmp_path / "old"))
    assert "certificate has expired" in str(outcome.server_error)


def test_revoked_certificate_is_refused(pki: PKI, pki_dir: Path, tmp_path: Path) -> None:
    pki.issue("dev-1", out=tmp_path / "dev-1")
    pki.issue("dev-2", out=tmp_path / "dev-2")
    pki.revoke("dev-1", reason="key-compromise")
    server = server_context_for_pki(pki_dir)  # a fresh context picks up the new CRL
    assert "certificate revoked" in str(
        handshake(server, client_context_for_credentials(tmp_path / "dev-1")).server_error
    )
    ok = handshake(server, client_context_for_credentials(tmp_path / "dev-2"))
    assert ok.server_error is None
    assert ok.client_error is None


def test_server_auth_only_certificate_is_refused_as_client(
    pki: PKI, pki_dir: Path, tmp_path: Path, server_ctx: ssl.SSLContext
) -> None:
    pki.issue("dev-srv", out=tmp_path / "srv", extended_key_usage=[ExtendedKeyUsageOID.SERVER_AUTH])
    outcome = handshake(server_ctx, client_context_for_credentials(tmp_path / "srv"))
    assert "unsuitable certificate purpose" in str(outcome.server_error)


def test_device_refuses_a_broker_from_another_pki(
    pki: PKI, foreign_pki: PKI, tmp_path: Path
) -> None:
    """The device trusts only its own root: a foreign broker certificate fails on the client."""
    pki.issue("dev-1", out=tmp_path / "dev-1")
    outcome = handshake(
        server_context_for_pki(foreign_pki.path), client_context_for_credentials(tmp_path / "dev-1")
    )
    assert "certificate verify failed" in str(outcome.client_error)


def test_device_refuses_a_wrong_host_name(
    pki: PKI, pki_dir: Path, tmp_path: Path, server_ctx: ssl.SSLContext
) -> None:
    pki.issue("dev-1", out=tmp_path / "dev-1")
    outcome = handshake(
        server_ctx, client_context_for_credentials(tmp_path / "dev-1"), host="elsewhere.test"
    )
    assert "Hostname mismatch" in str(outcome.client_error)
    named = handshake(
        server_ctx, client_context_for_credentials(tmp_path / "dev-1"), host="broker.test"
    )
    assert named.client_error is None


def test_tls_1_2_is_the_floor_and_works(
    pki: PKI, pki_dir: Path, tmp_path: Path, server_ctx: ssl.SSLContext
) -> None:
    """Old devices that stop at TLS 1.2 still connect; nothing older is offered."""
    assert server_ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    pki.issue("dev-1", out=tmp_path / "dev-1")
    ctx = client_context_for_credentials(tmp_path / "dev-1")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    outcome = handshake(server_ctx, ctx)
    assert outcome.server_error is None
    assert outcome.client_error is None
    pki.revoke("dev-1")
    refused = handshake(server_context_for_pki(pki_dir), ctx)
    assert "certificate revoked" in str(refused.server_error)


def test_server_issues_no_session_tickets(
    pki: PKI, pki_dir: Path, tmp_path: Path, server_ctx: ssl.SSLContext
) -> None:
    """No tickets: a revoked client cannot come back on a resumed TLS 1.3 session."""
    pki.issue("dev-1", out=tmp_path / "dev-1")
    client = client_context_for_credentials(tmp_path / "dev-1")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(tls.recv(1))

    thread = threading.Thread(target=serve)
    thread.start()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"x")
        assert tls.recv(1) == b"x"
        session = tls.session
    thread.join(10)
    listener.close()
    assert session is None or not session.has_ticket


def _check(cred_dir: Path, trust: Path | None = None) -> dict[str, object]:
    return check_client_credentials(
        cert_chain=cred_dir / "device.crt",
        key=cred_dir / "device.key",
        trust=trust or cred_dir / "ca.crt",
    )


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("good", None),
        ("foreign", "unable to get local issuer certificate"),
        ("server-auth-only", "unsuitable certificate purpose"),
    ],
)
def test_local_check_agrees_with_the_broker(
    pki: PKI,
    foreign_pki: PKI,
    pki_dir: Path,
    tmp_path: Path,
    server_ctx: ssl.SSLContext,
    case: str,
    fragment: str | None,
) -> None:
    """check_client_credentials (no network) gives the verdict a real broker handshake gives."""
    out = tmp_path / case
    if case == "foreign":
        foreign_pki.issue("dev-1", out=out)
    else:
        eku = [ExtendedKeyUsageOID.SERVER_AUTH] if case == "server-auth-only" else None
        pki.issue("dev-1", out=out, extended_key_usage=eku)
    root = pki_dir / "root.crt"
    # The client trusts our root, so only the server's verdict on the client certificate counts.
    client = client_context(trust=root, cert_chain=out / "device.crt", key=out / "device.key")
    real = handshake(server_ctx, client).server_error
    if fragment is None:
        assert real is None
        peer = _check(out, root)
        assert ("URI", "spiffe://fleet.example/device/dev-1") in peer["subjectAltName"]  # type: ignore[operator]
        return
    assert fragment in str(real)
    with pytest.raises(PKIError, match=fragment):
        _check(out, root)


def test_local_check_leaves_dates_to_the_caller(
    pki: PKI, pki_dir: Path, tmp_path: Path, server_ctx: ssl.SSLContext
) -> None:
    """Expired: the broker refuses, the local check returns the dates (a device reports them)."""
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    pki.issue("dev-old", out=tmp_path / "old", now=long_ago, days=1)
    real = handshake(server_ctx, client_context_for_credentials(tmp_path / "old")).server_error
    assert "certificate has expired" in str(real)
    peer = _check(tmp_path / "old")
    not_after = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(str(peer["notAfter"])), dt.UTC)
    assert not_after < dt.datetime.now(dt.UTC)


def test_local_check_never_prompts_for_a_passphrase(pki: PKI, tmp_path: Path) -> None:
    pki.issue("dev-1", out=tmp_path / "dev-1")
    key_file = tmp_path / "dev-1" / "device.key"
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(PKIError, match=r"device\.key is encrypted"):
        _check(tmp_path / "dev-1")


def test_the_key_store_of_a_credential_directory(tmp_path: Path) -> None:
    """identity.json names the key store; none (or no identity.json) is a file key."""
    assert keystore_for_credentials(tmp_path).keystore == "file"
    (tmp_path / "identity.json").write_text('{"device_id": "dev-1"}')
    assert keystore_for_credentials(tmp_path).keystore == "file"
    (tmp_path / "identity.json").write_text('{"device_id": "dev-1", "keystore": "tpm"}')
    tpm = keystore_for_credentials(tmp_path, "swtpm:port=1")
    assert isinstance(tpm, TpmBackend)
    assert tpm.tcti == "swtpm:port=1"
    (tmp_path / "identity.json").write_text('{"keystore": "smartcard"}')
    with pytest.raises(PKIError, match="unknown key store 'smartcard'"):
        keystore_for_credentials(tmp_path)


def test_an_encrypted_key_is_never_prompted_for(pki: PKI, tmp_path: Path) -> None:
    """OpenSSL asks on the terminal for a PEM pass phrase unless given a callback: a service
    must fail with the variable to set (PKI keys) or the fix (a device key) instead."""
    pki.issue("dev-1", out=tmp_path / "dev-1")
    key_path = tmp_path / "dev-1" / "device.key"
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(PassphraseError, match="unencrypted PEM key is needed"):
        client_context_for_credentials(tmp_path / "dev-1")
    encrypted = PKI.init(tmp_path / "enc", trust_domain="fleet.example", passphrase=b"s3cret")
    encrypted.close()
    with pytest.raises(PassphraseError, match=r"server\.key is encrypted; set IOTAUTH_CA_"):
        server_context_for_pki(tmp_path / "enc")
    with pytest.raises(PassphraseError, match="wrong IOTAUTH_CA_PASSPHRASE"):
        server_context_for_pki(tmp_path / "enc", password=b"nope")
    server_context_for_pki(tmp_path / "enc", password=b"s3cret")

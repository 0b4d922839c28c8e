"""The one module that builds every ``ssl.SSLContext`` of the project.

Servers require a client certificate that chains to the fleet root, check the CRL for the leaf,
and refuse TLS below 1.2. Session tickets are off, so a resumed session can never skip a
revocation check that a full handshake would make. Clients verify the server against the
provisioned trust anchor and its host name.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from provisioning.errors import PKIError

__all__ = [
    "client_context",
    "client_context_for_credentials",
    "server_context",
    "server_context_for_pki",
]


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path, password: bytes | None) -> None:
    try:
        ctx.load_cert_chain(cert, key, password=password)
    except FileNotFoundError as exc:
        msg = f"cannot load TLS credentials: {exc.filename} is missing"
        raise PKIError(msg) from None
    except ssl.SSLError as exc:
        msg = f"cannot load TLS credentials {cert} / {key}: {exc.reason or exc}"
        raise PKIError(msg) from None


def _load_trust(ctx: ssl.SSLContext, cafile: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=cafile)
    except (FileNotFoundError, ssl.SSLError) as exc:
        msg = f"cannot load trust anchor {cafile}: {exc}"
        raise PKIError(msg) from None


def server_context(
    *,
    cert_chain: Path,
    key: Path,
    trust: Path,
    crl: Path | None = None,
    password: bytes | None = None,
) -> ssl.SSLContext:
    """A server that demands a client certificate from the fleet (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    # No TLS 1.3 tickets and no TLS 1.2 tickets. TLS 1.2 session-ID resumption stays possible
    # within one context's cache, so whoever reloads a CRL must build a new context (the cache
    # goes with the old one) rather than add the CRL to a live context.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    _load_trust(ctx, trust)
    if crl is not None:
        _load_trust(ctx, crl)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    _load_chain(ctx, cert_chain, key, password)
    return ctx


def client_context(
    *,
    trust: Path,
    cert_chain: Path | None = None,
    key: Path | None = None,
    password: bytes | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client that verifies the server against ``trust`` and presents its own certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.check_hostname = check_hostname
    _load_trust(ctx, trust)
    if cert_chain is not None:
        _load_chain(ctx, cert_chain, key or cert_chain, password)
    return ctx


def server_context_for_pki(
    pki_dir: Path, *, password: bytes | None = None, check_crl: bool = True
) -> ssl.SSLContext:
    """The broker's context from a PKI directory (DESIGN.md layout)."""
    return server_context(
        cert_chain=pki_dir / "server.crt",
        key=pki_dir / "private" / "server.key",
        trust=pki_dir / "root.crt",
        crl=pki_dir / "crl.pem" if check_crl else None,
        password=password,
    )


def client_context_for_credentials(
    cred_dir: Path, *, check_hostname: bool = True
) -> ssl.SSLContext:
    """A device's or service's context from its credential directory."""
    return client_context(
        trust=cred_dir / "ca.crt",
        cert_chain=cred_dir / "device.crt",
        key=cred_dir / "device.key",
        check_hostname=check_hostname,
    )

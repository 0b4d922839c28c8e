"""The agent's one ``ssl.SSLContext`` builder.

It mirrors ``provisioning.tls.client_context`` on purpose instead of importing it: a
device installs with ``pip install iotauth[agent]`` and may import only
``provisioning.identity`` (DESIGN.md, the dependency rule; ``tests/test_layout.py``), so the
station's TLS module is out of reach. Keep the two in step: TLS >= 1.2, the server verified
against the provisioned trust anchor (``ca.crt``) with ``VERIFY_X509_STRICT``, and its host
name checked.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from device_agent.errors import CredentialError

__all__ = ["client_context"]


def client_context(
    *, trust: Path, cert_chain: Path, key: Path, check_hostname: bool = True
) -> ssl.SSLContext:
    """Mutual TLS client: present ``cert_chain``/``key``, verify the broker against ``trust``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.check_hostname = check_hostname
    try:
        ctx.load_verify_locations(cafile=trust)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialError(
            str(trust.parent), f"cannot load trust anchor {trust.name}: {exc}"
        ) from None
    try:
        ctx.load_cert_chain(cert_chain, key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise CredentialError(
            str(cert_chain.parent), f"cannot load {cert_chain.name} / {key.name}: {reason}"
        ) from None
    return ctx

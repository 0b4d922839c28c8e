"""A service's shared secret: made here, stored only as its SCRAM-SHA-256 verifier, checked here.

The secret is 256 random bits (``secrets.token_urlsafe``), printed once by ``iotauth service
secret`` and never written anywhere by us. The registry keeps the SCRAM verifier of RFC 5802 /
RFC 7677 (salt, iteration count, StoredKey, ServerKey), made by ``scramp``: the same verifier
serves the ``password`` method (the secret as the MQTT password, checked here) and SCRAM over MQTT
5 enhanced authentication (the secret never sent). No cryptography is written by hand here:
scramp derives the keys (PBKDF2-HMAC-SHA-256, then HMAC and SHA-256 as the RFC says) and the
comparison is ``hmac.compare_digest``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import secrets

from scramp import ScramMechanism

from provisioning.registry import SecretRecord

__all__ = [
    "ITERATIONS",
    "MECHANISM",
    "check_secret",
    "make_secret",
    "make_verifier",
    "service_methods",
]

MECHANISM = "SCRAM-SHA-256"
# RFC 7677 §4: at least 4096. The cost falls on whoever checks a password (the broker, for the
# password method) and on the SCRAM client, never on a SCRAM server.
ITERATIONS = 4096


def make_secret() -> str:
    """A fresh secret: 43 URL-safe characters (256 bits), fit for an environment variable."""
    return secrets.token_urlsafe(32)


def make_verifier(
    name: str, secret: str, *, version: int, now: dt.datetime, iterations: int = ITERATIONS
) -> SecretRecord:
    """The verifier of ``secret`` with a fresh random salt (scramp makes it)."""
    if iterations < ITERATIONS:
        msg = f"the iteration count must be at least {ITERATIONS} (RFC 7677)"
        raise ValueError(msg)
    salt, stored_key, server_key, count = ScramMechanism(MECHANISM).make_auth_info(
        secret, iteration_count=iterations
    )
    return SecretRecord(
        name=name,
        version=version,
        mechanism=MECHANISM,
        salt=_b64(salt),
        iterations=count,
        stored_key=_b64(stored_key),
        server_key=_b64(server_key),
        status="active",
        created_at=now,
    )


def check_secret(record: SecretRecord, secret: str) -> bool:
    """Whether ``secret`` is the one ``record`` verifies: scramp derives StoredKey from it with
    the record's salt and count; the comparison takes the same time wherever they differ."""
    try:
        _, stored_key, _, _ = ScramMechanism(record.mechanism).make_auth_info(
            secret, iteration_count=record.iterations, salt=base64.b64decode(record.salt)
        )
    except Exception:  # noqa: BLE001 - saslprep refuses some strings: then it is not the secret
        return False
    return hmac.compare_digest(stored_key, base64.b64decode(record.stored_key))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def service_methods(
    *, certified: bool, secret: SecretRecord | None, registered: bool = False
) -> list[str]:
    """The methods a service holds a credential for, in ``--listen`` METHODS order (a broker's
    listeners and its methods per kind decide which it may use): an active certificate for mtls,
    an active secret for scram and password, any of them or an active registration
    (``iotauth service register``) for oidc (the token's subject must be a registered,
    unrevoked service)."""
    secret_active = secret is not None and secret.status == "active"
    methods = ["mtls"] if certified else []
    if certified or secret_active or registered:
        methods.append("oidc")
    if secret_active:
        methods += ["scram", "password"]
    return methods

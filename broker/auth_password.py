"""The ``password`` method: a service's API key as the MQTT password, over server-authenticated TLS.

username = the service name, password = the secret ``iotauth service secret`` printed. The broker
holds no secret: it reads the service's SCRAM-SHA-256 verifier from the registry and checks the
password against it with :func:`provisioning.service_secrets.check_secret` (scramp derives the
StoredKey, ``hmac.compare_digest`` compares). An unknown service costs the same derivation as a
known one, so timing does not tell which names exist.

Guessing is rate-limited (:class:`Backoff`): after ``free_failures`` wrong answers from one source
address, or for one service name, that key is backed off for ``base`` seconds, doubling with each
further failure up to ``cap``; while backed off a CONNECT is refused *without checking* the
password (audited ``auth-backoff``), so a listener cannot be used as a guessing oracle. A right
answer from an address that is not backed off clears its counts.

The session's ``credential`` is ``name#version`` of the verifier it matched: a rotation (new
version) or ``service revoke`` ends it within a second (:class:`SecretSource` is polled by the
broker, see broker/server.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import functools
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from broker import mqtt
from broker.auth import Authenticated, ConnectionFacts
from broker.errors import ConfigError, Refused
from provisioning.config import PKIConfig
from provisioning.errors import InvalidIdentityError, ProvisioningError
from provisioning.identity import Identity, IdentityKind
from provisioning.registry import Registry, RegistryBackend, SecretRecord
from provisioning.service_secrets import check_secret, make_verifier

__all__ = ["Backoff", "PasswordAuthenticator", "SecretSource"]

_BAD_CREDENTIALS = mqtt.CONNACK_BAD_CREDENTIALS


@dataclass(slots=True)
class _Strikes:
    failures: int = 0
    until: float = 0.0


def address_key(peer: str) -> str:
    """The backoff key of a client's address (``host:port`` -> ``addr:host``: any source port)."""
    return "addr:" + peer.rsplit(":", 1)[0]


def service_key(name: str) -> str:
    """The backoff key of a service name, shared by every method that checks its secret."""
    return f"service:{name}"


class Backoff:
    """Failed attempts per key (``addr:...``, ``service:...``) and the time each is backed off.

    Bounded: at most ``capacity`` keys; when full, the key backed off least is forgotten.
    """

    def __init__(
        self,
        *,
        free_failures: int = 3,
        base: float = 1.0,
        cap: float = 300.0,
        capacity: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free_failures = free_failures
        self.base = base
        self.cap = cap
        self.capacity = capacity
        self.clock = clock
        self._keys: dict[str, _Strikes] = {}

    def wait(self, key: str) -> float:
        """Seconds ``key`` stays backed off (0: it may try now)."""
        strikes = self._keys.get(key)
        return max(0.0, strikes.until - self.clock()) if strikes else 0.0

    def failure(self, key: str) -> float:
        """Count a failure; return the backoff it starts (0 while failures are still free)."""
        strikes = self._keys.get(key)
        if strikes is None:
            if len(self._keys) >= self.capacity:
                del self._keys[min(self._keys, key=lambda k: self._keys[k].until)]
            strikes = self._keys[key] = _Strikes()
        strikes.failures += 1
        over = strikes.failures - self.free_failures
        if over <= 0:
            return 0.0
        delay = min(self.cap, self.base * 2.0 ** min(over - 1, 32))
        strikes.until = self.clock() + delay
        return delay

    def success(self, key: str) -> None:
        self._keys.pop(key, None)

    def check(self, keys: list[str], who: str | None) -> None:
        """Refuse (``auth-backoff``, unchecked) while any of ``keys`` is backed off."""
        waits = {key: self.wait(key) for key in keys}
        if any(waits.values()):
            key, left = max(waits.items(), key=lambda kv: kv[1])
            raise Refused(
                "auth-backoff",
                f"too many failed attempts ({key.split(':', 1)[0]}); refused unchecked for "
                f"{left:.1f} s more",
                connack=mqtt.CONNACK_NOT_AUTHORIZED,
                identity=who,
            )


class SecretSource:
    """The registry's services and their verifiers, read on one worker thread (a SQLite
    connection stays on the thread that opened it; a PostgreSQL one is not shared either)."""

    def __init__(self, pki_dir: Path, *, retry_seconds: float = 2.0) -> None:
        try:
            self._config = PKIConfig.load(pki_dir / "pki.toml")
        except (OSError, ProvisioningError) as exc:
            msg = f"{pki_dir} is not a usable PKI directory: {exc}"
            raise ConfigError(msg) from None
        self._pki_dir = pki_dir
        self._retry_seconds = retry_seconds
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "iotauth-secrets")
        self._registry: RegistryBackend | None = None

    @property
    def trust_domain(self) -> str:
        return self._config.trust_domain

    def _open(self) -> RegistryBackend:
        if self._registry is None:
            if self._config.registry:
                from provisioning.registry_pg import PostgresRegistry

                self._registry = PostgresRegistry(
                    self._config.registry, retry_seconds=self._retry_seconds
                )
            else:
                self._registry = Registry(self._pki_dir / "registry.sqlite3")
        return self._registry

    def _read_secret(self, name: str) -> SecretRecord | None:
        return self._open().secret(name)

    def _read_states(self) -> dict[str, tuple[int, str]]:
        return self._open().secret_states()

    def _read_service_active(self, name: str) -> bool:
        registry = self._open()
        cert = registry.active(name)
        if cert is not None:
            return cert.kind == "service"
        secret = registry.secret(name)
        if secret is not None and secret.status == "active":
            return True
        registration = registry.registration(name)
        return registration is not None and registration.status == "active"

    def _read_registrations(self) -> dict[str, str]:
        return self._open().registration_states()

    async def service_active(self, name: str) -> bool:
        """Whether ``name`` is a registered service that is not revoked (an active certificate
        of kind service, an active secret, or an active registration by name): what the oidc
        method requires of a token's subject."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._read_service_active, name)

    async def secret(self, name: str) -> SecretRecord | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._read_secret, name)

    async def states(self) -> dict[str, tuple[int, str]]:
        """name -> (version, status) of every service secret."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._read_states)

    async def registrations(self) -> dict[str, str]:
        """name -> status of every service registered by name (``service register``)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._read_registrations)

    def close(self) -> None:
        def close_registry() -> None:
            if self._registry is not None:
                self._registry.close()
                self._registry = None

        self._executor.submit(close_registry).result(timeout=10)
        self._executor.shutdown(wait=True)


@functools.cache
def _decoy() -> SecretRecord:
    """The verifier an unknown name is checked against, so a miss costs what a hit costs."""
    return make_verifier("decoy", secrets.token_urlsafe(32), version=1, now=dt.datetime.now(dt.UTC))


class PasswordAuthenticator:
    """username = service name, password = its secret, against the registry's verifier."""

    def __init__(
        self,
        *,
        trust_domain: str,
        secret: Callable[[str], Awaitable[SecretRecord | None]],
        backoff: Backoff | None = None,
    ) -> None:
        self._trust_domain = trust_domain
        self._secret = secret
        self.backoff = backoff or Backoff()

    async def authenticate(self, facts: ConnectionFacts) -> Authenticated:
        name = facts.username or ""
        try:
            identity = Identity(IdentityKind.SERVICE, name, self._trust_domain)
        except InvalidIdentityError:
            identity = None
        who = str(identity) if identity else None
        keys = [address_key(facts.peer)] + ([service_key(name)] if identity else [])
        self.backoff.check(keys, who)
        record = await self._secret(name) if identity else None
        usable = record is not None and record.status == "active"
        candidate = record if usable and record is not None else _decoy()
        ok = await asyncio.to_thread(check_secret, candidate, facts.password or "")
        if usable and ok and identity is not None and record is not None:
            for key in keys:
                self.backoff.success(key)
            return Authenticated(identity=identity, method="password", credential=record.credential)
        delays = [self.backoff.failure(key) for key in keys]
        if identity is None:
            reason, detail = "password-bad-username", "the username is not a service name"
        elif record is None:
            reason, detail = "password-unknown", f"service {name} has no secret"
        elif record.status != "active":
            reason, detail = "password-revoked", f"the secret of service {name} is revoked"
        else:
            reason, detail = "password-wrong", f"wrong secret for service {name}"
        if max(delays) > 0:
            detail += f"; backed off for {max(delays):.0f} s"
        raise Refused(reason, detail, connack=_BAD_CREDENTIALS, identity=who)

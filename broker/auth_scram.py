"""The ``scram`` method: SCRAM-SHA-256 (RFC 5802, RFC 7677) over MQTT 5 enhanced authentication.

A service proves it knows its secret without sending it, and the broker proves it holds the
secret's verifier: the exchange rides in the Authentication Data of CONNECT, AUTH and CONNACK
(MQTT 5.0 section 4.12), with Authentication Method ``SCRAM-SHA-256``::

    CONNECT  method=SCRAM-SHA-256 data=client-first   ("n,,n=dash,r=<client nonce>")
    AUTH 0x18                     data=server-first   ("r=<nonce>,s=<salt>,i=4096")
    AUTH 0x18                     data=client-final   ("c=biws,r=<nonce>,p=<proof>")
    CONNACK 0x00                  data=server-final   ("v=<server signature>")

The username (``n=``) is the service name (or its SPIFFE ID). The broker reads the verifier that
``iotauth service secret`` stored (salt, iteration count, StoredKey, ServerKey) and hands it to
scramp's ScramServer, which checks the proof and makes the server signature: HMAC and SHA-256
over stored keys only. The PBKDF2 of the secret is the *client's* work, so a SCRAM connect costs
the broker no more than a few hashes beyond its TLS handshake (bench/auth_connect.py).

What a caller cannot learn:

- whether a name exists: an unknown name gets a server-first with a salt derived from the name
  by an HMAC under a key this process drew at start (the same name always gets the same salt,
  as a real one would), and fails at the end exactly as a wrong proof does: same code (0x87), same
  reason string (``scram-failed``), the same registry read before it. The audit detail says which.
  (The key lives in memory only: across a restart an unknown name's salt changes, a real one's
  does not. docs/BROKER.md records this.)
- anything by guessing faster than the backoff allows: the password method's :class:`Backoff`
  (per source address and per service name) is consulted before the server-first is sent.

Channel binding: none (the client sends the GS2 flag ``n``). ``tls-unique`` is not defined for
TLS 1.3 (RFC 8446 appendix C.5, RFC 9266) and scramp has no ``tls-exporter``;
``tls-server-end-point`` would bind to the broker certificate, which the client already verifies
against the fleet's own root (not a public CA store), so a relay would need a broker certificate
from our CA: binding would add a second check of the same fact. Decision recorded in
docs/BROKER.md ("SCRAM").

The session's ``credential`` is ``name#version`` like the password method's, so a rotation or
``service revoke`` ends it within a second (broker/server.py, ``_watch_secrets``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from scramp import ScramException, ScramMechanism

from broker import mqtt
from broker.auth import Authenticated, AuthStep, ConnectionFacts
from broker.auth_password import Backoff, address_key, service_key
from broker.errors import Refused
from provisioning.errors import InvalidIdentityError
from provisioning.identity import Identity, IdentityKind, parse_spiffe_id
from provisioning.registry import SecretRecord
from provisioning.service_secrets import ITERATIONS, MECHANISM

__all__ = ["MECHANISM", "ScramAuthenticator"]

_NOT_AUTHORIZED = mqtt.CONNACK_NOT_AUTHORIZED  # 0x87 at level 5
_BAD_CREDENTIALS = mqtt.CONNACK_BAD_CREDENTIALS  # 0x86 at level 5
_MAX_MESSAGE = 1024  # a SCRAM message is ~100 bytes; a larger one is not a SCRAM message

# (salt, StoredKey, ServerKey, iteration count), as scramp's auth_fn returns them
_AuthInfo = tuple[bytes, bytes, bytes, int]
# What the first reading of a client-first is given: it only learns the name, never answers.
_PROBE: _AuthInfo = (bytes(32), bytes(32), bytes(32), ITERATIONS)


class ScramAuthenticator:
    """SCRAM-SHA-256 for services, against the registry's verifiers (``secret``)."""

    exchange_methods = frozenset({MECHANISM})

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
        self._mechanism = ScramMechanism(MECHANISM)
        self._decoy_key = secrets.token_bytes(32)

    async def authenticate(self, facts: ConnectionFacts) -> Authenticated:
        """A plain CONNECT never reaches this (``presented_method`` never names scram)."""
        raise Refused(
            "method-not-allowed",
            f"scram runs in MQTT 5 enhanced authentication (Authentication Method {MECHANISM})",
        )

    def begin(self, method: str, facts: ConnectionFacts) -> ScramExchange:
        if method != MECHANISM:
            raise Refused("bad-auth-method", f"authentication method {method!r} is not offered")
        return ScramExchange(self, facts)

    def decoy(self, name: str) -> _AuthInfo:
        """A verifier for a name with none: stable per name while the broker runs, so asking
        twice does not tell a real salt (fixed) from a made-up one (were it random)."""

        def derive(label: bytes) -> bytes:
            return hmac.digest(self._decoy_key, label + b"\0" + name.encode(), hashlib.sha256)

        return derive(b"salt"), derive(b"stored-key"), derive(b"server-key"), ITERATIONS

    async def verifier(self, name: str) -> SecretRecord | None:
        return await self._secret(name)

    @property
    def mechanism(self) -> ScramMechanism:
        return self._mechanism

    @property
    def trust_domain(self) -> str:
        return self._trust_domain


class ScramExchange:
    """One client's SCRAM exchange: client-first -> server-first, client-final -> server-final."""

    def __init__(self, auth: ScramAuthenticator, facts: ConnectionFacts) -> None:
        self._auth = auth
        self._round = 0
        self._server: Any = None  # scramp's ScramServer (scramp has no type hints)
        self._identity: Identity | None = None
        self._record: SecretRecord | None = None
        self._keys: list[str] = [address_key(facts.peer)]

    async def step(self, data: bytes | None) -> AuthStep:
        self._round += 1
        if self._round == 1:
            return await self._first(_text(data, "client-first"))
        if self._round == 2:
            return self._final(_text(data, "client-final"))
        raise Refused("scram-malformed", "the exchange is over", connack=_NOT_AUTHORIZED)

    async def _first(self, client_first: str) -> AuthStep:
        auth = self._auth
        auth.backoff.check(self._keys, None)
        # scramp asks for the verifier synchronously inside set_client_first, and our registry is
        # read asynchronously: read the message once to learn the name (scramp validates it),
        # then once more with the verifier. Parsing ~100 bytes twice costs microseconds.
        names: list[str] = []

        def capture(user: str) -> _AuthInfo:
            names.append(user)
            return _PROBE

        probe = auth.mechanism.make_server(capture)
        try:
            probe.set_client_first(client_first)
        except ScramException as exc:
            raise Refused(
                "scram-malformed", f"client-first: {exc}", connack=_NOT_AUTHORIZED
            ) from None
        name = names[0]
        identity = self._identity_of(name)
        self._identity = identity
        self._keys.append(service_key(identity.name))
        auth.backoff.check(self._keys, str(identity))
        record = await auth.verifier(identity.name)
        self._record = record
        info: _AuthInfo = (
            (
                base64.b64decode(record.salt),
                base64.b64decode(record.stored_key),
                base64.b64decode(record.server_key),
                record.iterations,
            )
            if record is not None and record.mechanism == MECHANISM
            else auth.decoy(identity.name)
        )
        server = auth.mechanism.make_server(lambda _user: info)
        server.set_client_first(client_first)
        self._server = server
        return AuthStep(data=server.get_server_first().encode())

    def _final(self, client_final: str) -> AuthStep:
        server, identity, record = self._server, self._identity, self._record
        if server is None or identity is None:  # round 1 refused: the exchange is over
            raise Refused("scram-malformed", "client-final without a client-first")
        who = str(identity)
        try:
            server.set_client_final(client_final)
            proof_ok = True
            problem = ""
        except ScramException as exc:
            proof_ok = False
            invalid_proof = getattr(exc.server_error, "value", "") == "invalid-proof"
            problem = "wrong proof" if invalid_proof else f"client-final: {exc}"
        if proof_ok and record is not None and record.status == "active":
            for key in self._keys:
                self._auth.backoff.success(key)
            final = server.get_server_final()
            return AuthStep(
                data=final.encode(),
                authenticated=Authenticated(
                    identity=identity, method="scram", credential=record.credential
                ),
            )
        delays = [self._auth.backoff.failure(key) for key in self._keys]
        if record is None:
            detail = f"service {identity.name} has no secret"
        elif record.status != "active":
            detail = f"the secret of service {identity.name} is revoked"
        else:
            detail = f"{problem} for service {identity.name}"
        if max(delays) > 0:
            detail += f"; backed off for {max(delays):.0f} s"
        # One reason on the wire for all of these: the client must not learn which it was.
        raise Refused("scram-failed", detail, connack=_NOT_AUTHORIZED, identity=who)

    def _identity_of(self, name: str) -> Identity:
        """The service ``name`` (a service name, or a SPIFFE ID of this trust domain) names."""
        domain = self._auth.trust_domain
        try:
            identity = (
                parse_spiffe_id(name)
                if name.startswith("spiffe://")
                else Identity(IdentityKind.SERVICE, name, domain)
            )
        except InvalidIdentityError as exc:
            raise Refused(
                "scram-bad-username", f"{name!r}: {exc}", connack=_BAD_CREDENTIALS
            ) from None
        if identity.trust_domain != domain:
            raise Refused(
                "foreign-trust-domain", f"{identity.trust_domain} is not {domain}",
                connack=_BAD_CREDENTIALS,
            )  # fmt: skip
        if identity.kind is not IdentityKind.SERVICE:
            # A device proves itself with its own key (mtls, jwt), never with a shared secret.
            raise Refused(
                "method-not-allowed", f"a {identity.kind.value} may not use scram",
                identity=str(identity),
            )  # fmt: skip
        return identity


def _text(data: bytes | None, what: str) -> str:
    if not data:
        raise Refused("scram-malformed", f"no {what} in Authentication Data")
    if len(data) > _MAX_MESSAGE:
        raise Refused("scram-malformed", f"{what} of {len(data)} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("scram-malformed", f"{what} is not UTF-8") from None

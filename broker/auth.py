"""Who is this client: the one interface the broker asks, and mutual TLS as its first answer.

The broker hands an :class:`Authenticator` the facts of a connection (TLS session, client_id,
username, password, peer) after CONNECT is read and *before* any session state is touched. It
returns :class:`Authenticated` or raises :class:`~broker.errors.Refused` with a reason. ACLs and
sessions only ever see the resulting :class:`~provisioning.identity.Identity`, so a JWT,
challenge-response or PKCS#11 authenticator can be added without changing them. Binding the
MQTT client_id to the identity is the broker's job (``BrokerCore`` in ``broker.core``), not the
authenticator's, so every authenticator gets it for free.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.errors import Refused
from broker.metrics import Metrics
from provisioning.errors import InvalidIdentityError
from provisioning.identity import Identity, parse_spiffe_id

__all__ = [
    "CERTIFICATE_METHODS",
    "AuthExchange",
    "AuthStep",
    "Authenticated",
    "Authenticator",
    "ConnectionFacts",
    "ExchangeAuthenticator",
    "ListenerAuthenticator",
    "MutualTLSAuthenticator",
    "certificate_identity",
    "check_certificate_now",
    "presented_method",
]


# Methods whose ``Authenticated.credential`` is a certificate serial, so the CRL revokes them.
CERTIFICATE_METHODS = frozenset({"mtls", "jwt"})


@dataclass(frozen=True, slots=True)
class ConnectionFacts:
    """What the transport and the CONNECT packet say. Nothing here is trusted yet."""

    client_id: str
    username: str | None
    password: str | None
    peer: str
    tls: ssl.SSLObject | None


@dataclass(frozen=True, slots=True)
class Authenticated:
    """A proven identity and the credential that proved it.

    ``credential`` is what revocation names (the certificate serial in lower-case hex for mutual
    TLS, the same spelling as the registry); ``not_after`` lets the broker end a session whose
    credential expires while it is connected.
    """

    identity: Identity
    method: str
    credential: str
    not_after: dt.datetime | None = None


class Authenticator(Protocol):
    async def authenticate(self, facts: ConnectionFacts) -> Authenticated:
        """Return who the client is, or raise Refused(reason)."""
        ...


@dataclass(frozen=True, slots=True)
class AuthStep:
    """One answer of an :class:`AuthExchange`: ``data`` for the client, and ``authenticated``
    once the exchange has succeeded (then ``data``, if any, goes in the CONNACK, or in the AUTH
    0x00 of a re-authentication; else in an AUTH 0x18 Continue authentication)."""

    data: bytes | None = None
    authenticated: Authenticated | None = None


class AuthExchange(Protocol):
    """One MQTT 5 extended authentication (4.12) in progress: challenge and response."""

    async def step(self, data: bytes | None) -> AuthStep:
        """The client's Authentication Data (the CONNECT's first, then each AUTH's) -> the next
        step; raise Refused to end it (CONNACK 0x87 / 0x86; DISCONNECT if re-authenticating)."""
        ...


class ExchangeAuthenticator(Protocol):
    """An authenticator that can also run MQTT 5 extended authentication: ``begin`` starts an
    exchange for an Authentication Method it offers (SCRAM-SHA-256 will be the first). The
    broker asks for it with ``getattr(authenticator, "begin", None)``: an authenticator without
    it offers no method, and a CONNECT naming one is refused with 0x8C."""

    def begin(self, method: str, facts: ConnectionFacts) -> AuthExchange:
        """An exchange for ``method``, or raise Refused("bad-auth-method")."""
        ...


class MutualTLSAuthenticator:
    """Identity from the client certificate that the TLS layer already verified.

    The TLS context (provisioning.tls) has checked the chain, CRL, validity and purpose during
    the handshake. This re-checks what a *resumed* TLS session would skip (revocation and expiry
    at this moment) and reads the identity: exactly one SAN URI in this trust domain, a CN that
    agrees, an end-entity certificate with clientAuth. Username and password are ignored.
    """

    def __init__(
        self,
        *,
        trust_domain: str,
        is_revoked: Callable[[int], bool],
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._trust_domain = trust_domain
        self._is_revoked = is_revoked
        self._clock = clock

    async def authenticate(self, facts: ConnectionFacts) -> Authenticated:
        if facts.tls is None:
            raise Refused("no-tls", "the connection is not TLS")
        der = facts.tls.getpeercert(binary_form=True)
        if not der:
            raise Refused("no-certificate", "the client sent no certificate")
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise Refused("bad-certificate", "the client certificate cannot be parsed") from None
        identity = certificate_identity(cert, self._trust_domain)
        check_certificate_now(cert, identity, self._clock(), self._is_revoked)
        return Authenticated(
            identity=identity,
            method="mtls",
            credential=format(cert.serial_number, "x"),
            not_after=cert.not_valid_after_utc,
        )


def check_certificate_now(
    cert: x509.Certificate,
    identity: Identity,
    now: dt.datetime,
    is_revoked: Callable[[int], bool],
) -> None:
    """Validity and revocation at this moment (what a resumed TLS session or a token skips)."""
    if now >= cert.not_valid_after_utc:
        raise Refused("expired", "the certificate has expired", identity=str(identity))
    if now < cert.not_valid_before_utc:
        raise Refused("not-yet-valid", "the certificate is not valid yet", identity=str(identity))
    if is_revoked(cert.serial_number):
        raise Refused("revoked", "the certificate is revoked", identity=str(identity))


def certificate_identity(cert: x509.Certificate, trust_domain: str) -> Identity:
    """The identity an end-entity client certificate of this trust domain names, or Refused."""
    ext = cert.extensions
    try:
        if ext.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise Refused("ca-certificate", "a CA certificate cannot be a client")
    except x509.ExtensionNotFound:
        raise Refused("not-end-entity", "the certificate has no BasicConstraints") from None
    try:
        usages = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise Refused("wrong-purpose", "the certificate has no extended key usage") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise Refused("wrong-purpose", "the certificate is not for client authentication")
    try:
        sans = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise Refused("no-identity", "the certificate has no subjectAltName") from None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        # amqtt's contrib plugin reads uris[0] (and crashes on none); one URI, exactly.
        raise Refused("no-identity", f"expected exactly one SAN URI, found {len(uris)}")
    try:
        identity = parse_spiffe_id(uris[0])
    except InvalidIdentityError as exc:
        raise Refused("no-identity", str(exc)) from None
    if identity.trust_domain != trust_domain:
        raise Refused(
            "foreign-trust-domain",
            f"{identity.trust_domain} is not {trust_domain}",
            identity=str(identity),
        )
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or cns[0].value != identity.name:
        raise Refused(
            "cn-mismatch",
            "the subject CN does not equal the SAN identity",
            identity=str(identity),
        )
    return identity


class ListenerAuthenticator:
    """The methods one listener accepts, each with its authenticator; picks one per connection.

    The method follows from what the client presented, never from what it claims: a verified
    client certificate is ``mtls``; a password that is a compact JWS carrying ``x5c`` is ``jwt``,
    another JWS ``oidc``, any other password ``password``.
    A method the listener does not list is refused before any credential is checked, and a method
    that the identity's kind may not use (``methods_by_kind``) after it is: a service cannot come
    in with a device token, nor a device with a shared secret, whatever the listener accepts.
    """

    def __init__(
        self,
        methods: frozenset[str],
        authenticators: dict[str, Authenticator],
        methods_by_kind: dict[str, frozenset[str]],
        metrics: Metrics | None = None,
    ) -> None:
        self.methods = methods
        self._authenticators = authenticators
        self._methods_by_kind = methods_by_kind
        self._metrics = metrics

    def begin(self, method: str, facts: ConnectionFacts) -> AuthExchange:
        """MQTT 5 extended authentication: the listener's authenticator that offers ``method``
        (an :class:`ExchangeAuthenticator`), or Refused("bad-auth-method") (CONNACK 0x8C)."""
        for name in sorted(self.methods):
            begin = getattr(self._authenticators.get(name), "begin", None)
            offered: frozenset[str] = getattr(
                self._authenticators.get(name), "exchange_methods", frozenset()
            )
            if begin is not None and method in offered:
                return _KindChecked(
                    begin(method, facts), name, self._methods_by_kind, self._metrics
                )
        raise Refused("bad-auth-method", f"authentication method {method!r} is not offered")

    async def authenticate(self, facts: ConnectionFacts) -> Authenticated:
        method = presented_method(facts)
        if method not in self.methods:
            detail = (
                f"{method} is not accepted on this listener ({', '.join(sorted(self.methods))})"
            )
            if "scram" in self.methods:
                # e.g. an MQTT 3.1.1 client, which has no AUTH packet to run SCRAM in
                detail += "; scram needs MQTT 5 with Authentication Method SCRAM-SHA-256"
            raise Refused("method-not-allowed", detail, method=method)
        try:
            result = await self._authenticators[method].authenticate(facts)
        except Refused as refusal:
            refusal.method = refusal.method or method  # the audit line names the method
            raise
        allowed = self._methods_by_kind.get(result.identity.kind.value, frozenset())
        if method not in allowed:
            raise Refused(
                "method-not-allowed",
                f"a {result.identity.kind.value} may not use {method}",
                identity=str(result.identity),
                method=method,
            )
        if self._metrics is not None:
            self._metrics.inc("iotauth_broker_authentications_total", method=method)
        return result


def presented_method(facts: ConnectionFacts) -> str:
    """Which method the client's credentials are for (not whether they are any good)."""
    from provisioning.tokens import looks_like_jwt

    if facts.tls is not None and facts.tls.getpeercert(binary_form=True):
        return "mtls"
    if looks_like_jwt(facts.password):
        # A device signs its own token and names its certificate (x5c); an identity provider's
        # access token names a key of the provider's JWKS (kid) instead.
        import jwt

        try:
            header = jwt.get_unverified_header(facts.password or "")
        except jwt.DecodeError:
            return "jwt"  # the jwt method's own refusal says what is wrong with it
        return "jwt" if "x5c" in header else "oidc"
    if facts.password is not None:
        return "password"
    return "mtls"  # nothing presented: mutual TLS's own refusal says what is missing


class _KindChecked:
    """An exchange whose success is held to ``methods_by_kind`` like any other method's."""

    def __init__(
        self,
        inner: AuthExchange,
        method: str,
        methods_by_kind: dict[str, frozenset[str]],
        metrics: Metrics | None = None,
    ) -> None:
        self._inner = inner
        self._method = method
        self._methods_by_kind = methods_by_kind
        self._metrics = metrics

    async def step(self, data: bytes | None) -> AuthStep:
        try:
            result = await self._inner.step(data)
        except Refused as refusal:
            refusal.method = refusal.method or self._method
            raise
        done = result.authenticated
        if done is not None:
            kind = done.identity.kind.value
            if self._method not in self._methods_by_kind.get(kind, frozenset()):
                raise Refused(
                    "method-not-allowed",
                    f"a {kind} may not use {self._method}",
                    identity=str(done.identity),
                    method=self._method,
                )
            if self._metrics is not None:
                self._metrics.inc("iotauth_broker_authentications_total", method=self._method)
        return result
